//! C-ECHO SCP (PS3.7 §9.1.5, Verification SOP Class PS3.4 Annex A): always
//! Success while the node is serving associations.

use super::dimse::{self, CommandSet, command_field, status};

pub fn handle(request: &CommandSet) -> Vec<u8> {
    dimse::response(request, command_field::C_ECHO_RSP, status::SUCCESS, None)
}
