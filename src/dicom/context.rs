//! What the DIMSE services share: of the node (`DicomContext`, the
//! AE-title policy as dicom-ul's `AccessControl`, the negotiation options)
//! and of the association an operation runs on (`Op`, the presentation
//! contexts, PDUs received while it runs, sending responses). The services
//! (c_find, retrieve, commitment) and the association loop import this;
//! it imports none of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::association::AsyncServerAssociation;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{AssociationRJServiceUserReason, PDataValue, PDataValueType, UserIdentity};
use dicom_ul::{Pdu, ServerAssociationOptions};

use super::dimse::{CommandSet, command_field};
use super::report::Report;
use super::sop_classes;
use crate::config::{AllowedPeer, NodeConfig, QueryRetrieveAccess};
use crate::ingest::Ingest;
use crate::query::MatchOptions;

pub(super) type Options = ServerAssociationOptions<'static, PeerPolicy, RoleNegotiation>;

/// SCU/SCP role selection (PS3.7 D.3.3.4): a C-GET requestor asks for the
/// SCP role of the storage SOP classes it wants to receive on the
/// association; the node grants the roles asked for storage classes and
/// answers nothing for the rest (default roles).
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleNegotiation;

impl dicom_ul::association::server::Negotiation for RoleNegotiation {
    fn negotiate_roles(
        &self,
        sop_class_uid: &str,
        scu_role: bool,
        scp_role: bool,
    ) -> Option<dicom_ul::pdu::RequestorRoles> {
        sop_classes::is_storage(sop_class_uid.trim_end_matches('\0')).then_some(
            dicom_ul::pdu::RequestorRoles {
                scu: scu_role,
                scp: scp_role,
            },
        )
    }
}

/// What every association of this node shares.
pub struct DicomContext {
    pub ae_title: String,
    pub ingest: Ingest,
    pub artim_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_associations: usize,
    pub config: Arc<NodeConfig>,
    pub match_options: MatchOptions,
    /// The node's part in the region: regional priors in C-FIND answers.
    pub region: Option<Arc<crate::publish::Region>>,
    pub audit: crate::audit::Audit,
    policy: PeerPolicy,
    options: Options,
}

impl DicomContext {
    pub fn new(config: &NodeConfig, ingest: Ingest) -> DicomContext {
        let policy = PeerPolicy {
            allowed: Arc::new(config.allowed_calling_ae_titles.clone()),
            require_called_ae_title: config.require_called_ae_title,
            peer: IpAddr::from([0, 0, 0, 0]),
            ae_binding: Arc::new(super::tls::AeBinding::from_config(
                config.server_tls.as_ref(),
            )),
            tls_identity: None,
        };
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(policy.clone())
            .ae_title(config.ae_title.as_str().to_string())
            .max_pdu_length(config.max_pdu_length)
            // Strict: a peer may not send a PDU larger than we announced,
            // else one PDU could make us buffer up to 4 GiB.
            .strict(true)
            .promiscuous(false)
            .with_negotiation(RoleNegotiation)
            .with_abstract_syntax(uids::VERIFICATION)
            .with_abstract_syntax(uids::STORAGE_COMMITMENT_PUSH_MODEL);
        for sop_class in sop_classes::QUERY_RETRIEVE {
            options = options.with_abstract_syntax(*sop_class);
        }
        for sop_class in sop_classes::storage_sop_classes() {
            options = options.with_abstract_syntax(sop_class);
        }
        // No transfer syntax list: dicom-ul then accepts, per presentation
        // context, the first proposed transfer syntax its registry can
        // parse, which covers every native and encapsulated one, so each
        // instance is stored as the sender encoded it.
        DicomContext {
            ae_title: config.ae_title.as_str().to_string(),
            ingest,
            artim_timeout: config.artim_timeout,
            idle_timeout: config.idle_timeout,
            max_associations: config.max_associations,
            config: Arc::new(config.clone()),
            match_options: MatchOptions {
                case_insensitive_names: config.case_insensitive_names,
                fuzzy_names: false,
                max_matches: Some(config.max_query_matches),
            },
            region: None,
            audit: crate::audit::Audit::disabled(),
            policy,
            options,
        }
    }

    /// The shared options with the policy bound to this peer's address and,
    /// on the DICOM TLS listener, to the identity its certificate proves.
    pub(super) fn options_for(
        &self,
        peer: IpAddr,
        tls_identity: Option<super::tls::PeerIdentity>,
    ) -> Options {
        let policy = PeerPolicy {
            peer,
            tls_identity,
            ..self.policy.clone()
        };
        self.options.clone().ae_access_control(policy)
    }

    /// Whether a calling AE may query (`retrieve = false`) or retrieve.
    pub fn may(&self, calling_ae_title: &str, retrieve: bool) -> bool {
        match self.config.query_retrieve_access {
            QueryRetrieveAccess::Any => true,
            QueryRetrieveAccess::Listed => {
                self.config.remote_ae(calling_ae_title).is_some_and(|r| {
                    if retrieve {
                        r.may_retrieve
                    } else {
                        r.may_query
                    }
                })
            }
        }
    }
}

/// Who may associate: optionally only listed calling AE titles (each
/// optionally bound to a host), optionally only when calling our AE title.
/// An AE title bound to a certificate identity must present that
/// certificate (so only over DICOM TLS).
/// Refusals are A-ASSOCIATE-RJ (permanent, service user) with the reason
/// PS3.8 Table 9-21 gives.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Arc<Vec<AllowedPeer>>,
    require_called_ae_title: bool,
    peer: IpAddr,
    ae_binding: Arc<super::tls::AeBinding>,
    /// Filled by the TLS handshake, which runs before the A-ASSOCIATE-RQ
    /// is read; `None` on the plain listener.
    tls_identity: Option<super::tls::PeerIdentity>,
}

impl AccessControl for PeerPolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        crate::audit::association_requested(calling_ae_title, called_ae_title);
        if self.require_called_ae_title && called_ae_title.trim() != this_ae_title {
            return Err(crate::audit::association_refused(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            ));
        }
        if !self.allowed.is_empty()
            && !self
                .allowed
                .iter()
                .any(|a| a.admits(calling_ae_title, self.peer))
        {
            return Err(crate::audit::association_refused(
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            ));
        }
        let presented = self.tls_identity.as_ref().and_then(|i| i.get());
        if let Err(why) = self
            .ae_binding
            .check(calling_ae_title.trim(), presented.map(Vec::as_slice))
        {
            tracing::warn!(peer = %self.peer, calling_ae_title = ?calling_ae_title.trim(), reason = %why, "calling AE title refused by the certificate binding");
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// An accepted presentation context.
pub(super) struct Context {
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// What an operation needs of its association.
pub(super) struct Op<'a, S> {
    pub association: &'a mut AsyncServerAssociation<S>,
    pub pcid: u8,
    pub command: &'a CommandSet,
    pub context: &'a Context,
    pub contexts: &'a HashMap<u8, Context>,
    pub calling_ae_title: &'a str,
    pub ctx: &'a DicomContext,
    pub span: &'a tracing::Span,
    /// Storage commitment reports sent on this association and not yet
    /// acknowledged; delivered again over a new association if this one
    /// ends first.
    pub reports: &'a mut Vec<Report>,
}

impl<S: Transport> Op<'_, S> {
    /// Sends a response (a command set and, for a Pending C-FIND, its
    /// identifier). When both fit in one PDU of the peer's size they go as
    /// one P-DATA-TF with two PDVs: one write per match instead of two, which
    /// is most of the cost of a C-FIND returning thousands of matches.
    pub async fn send(
        &mut self,
        command: Vec<u8>,
        data_set: Option<Vec<u8>>,
    ) -> Result<(), String> {
        let Some(data) = data_set else {
            return send_command(self.association, self.pcid, command).await;
        };
        // Each PDV adds a 6-byte header to its value (PS3.8 9.3.5.1).
        let pdu_len = command.len() + data.len() + 12;
        let peer_max = self.association.requestor_max_pdu_length() as usize;
        if peer_max == 0 || pdu_len <= peer_max {
            return self
                .association
                .send(&Pdu::PData {
                    data: vec![
                        PDataValue {
                            presentation_context_id: self.pcid,
                            value_type: PDataValueType::Command,
                            is_last: true,
                            data: command,
                        },
                        PDataValue {
                            presentation_context_id: self.pcid,
                            value_type: PDataValueType::Data,
                            is_last: true,
                            data,
                        },
                    ],
                })
                .await
                .map_err(|e| format!("cannot send response: {e}"));
        }
        send_command(self.association, self.pcid, command).await?;
        send_data(self.association, self.pcid, data).await
    }
}

/// A PDU received while an operation runs.
pub(super) enum During {
    /// C-CANCEL-RQ for the operation's Message ID.
    Cancel,
    /// A C-CANCEL-RQ for another Message ID (PS3.7 §9.3.2.3 wants the
    /// outstanding one's): nothing of this operation's to cancel, so it is
    /// ignored rather than taken as a protocol error.
    StrayCancel,
    /// Another complete command (a C-STORE-RSP of a C-GET sub-operation).
    Command { command: CommandSet },
    /// A protocol violation or the end of the association.
    End(String),
}

/// Classifies a PDU received while an operation is outstanding.
pub(super) fn during(
    received: Result<Pdu, dicom_ul::association::Error>,
    message_id: u16,
) -> During {
    let pdu = match received {
        Ok(pdu) => pdu,
        Err(e) => return During::End(format!("while an operation was outstanding: {e}")),
    };
    match pdu {
        Pdu::PData { mut data } if data.len() == 1 => {
            let value = data.remove(0);
            if value.value_type != PDataValueType::Command || !value.is_last {
                return During::End("data while an operation was outstanding".into());
            }
            match CommandSet::parse(&value.data) {
                Ok(c) if c.command_field() == command_field::C_CANCEL_RQ => {
                    let cancelled =
                        c.u16(dicom_dictionary_std::tags::MESSAGE_ID_BEING_RESPONDED_TO);
                    if cancelled == Some(message_id) {
                        During::Cancel
                    } else {
                        tracing::info!(
                            message_id = cancelled,
                            outstanding = message_id,
                            "C-CANCEL-RQ for a Message ID not outstanding; ignored"
                        );
                        During::StrayCancel
                    }
                }
                Ok(c) => During::Command { command: c },
                Err(e) => During::End(format!("unparseable command set: {e}")),
            }
        }
        Pdu::AbortRQ { .. } => During::End("aborted by peer during an operation".into()),
        Pdu::ReleaseRQ => During::End("release requested during an operation".into()),
        other => During::End(format!(
            "unexpected {} during an operation",
            pdu_name(&other)
        )),
    }
}

/// The byte stream under an association: plain TCP, or TLS over TCP on the
/// DICOM TLS listener (PS3.15 B.9). Everything past negotiation is the
/// same code on both.
pub trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

impl<T> Transport for T where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static
{
}

pub(super) fn pdu_name(pdu: &Pdu) -> &'static str {
    match pdu {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "unknown",
    }
}

/// Sends a command set (never followed by a data set) on a presentation
/// context. Command sets are a few hundred bytes: one PDV always fits.
pub(super) async fn send_command<S: Transport>(
    association: &mut AsyncServerAssociation<S>,
    pcid: u8,
    command: Vec<u8>,
) -> Result<(), String> {
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pcid,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .await
        .map_err(|e| format!("cannot send response: {e}"))
}

/// Sends a data set on a presentation context, split into PDVs that fit
/// the peer's maximum PDU length.
pub(super) async fn send_data<S: Transport>(
    association: &mut AsyncServerAssociation<S>,
    pcid: u8,
    data: Vec<u8>,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut writer = association.send_pdata(pcid);
    writer
        .write_all(&data)
        .await
        .map_err(|e| format!("cannot send data set: {e}"))?;
    writer
        .finish()
        .await
        .map_err(|e| format!("cannot send data set: {e}"))
}
