//! The receive side of an established association, read by the node
//! itself: dicom-ul's PDU reader copies every P-DATA-TF PDU into a newly
//! allocated buffer, value by value (a quarter of the node's CPU time in the
//! ingest profiles of docs/benchmarks.md). Here a P-DATA-TF PDU is read into
//! the association's own read buffer, which is reused from one PDU to the
//! next, and its presentation data values are handed out as slices of it:
//! the bytes go from the socket into that buffer and from there straight to
//! the hasher and the staging file.
//!
//! Every other PDU (A-RELEASE-RQ, A-ABORT, anything unexpected) is left to
//! dicom-ul's reader, which reads it from the same buffer. The checks are
//! those dicom-ul makes in strict mode: a PDU longer than the maximum length
//! the node announced is refused before any of it is buffered, and a PDV
//! item that is shorter than its header or runs past the end of its PDU
//! makes the whole PDU malformed.

use bytes::{Buf, BytesMut};
use dicom_ul::Pdu;
use dicom_ul::association::{AsyncAssociation, AsyncServerAssociation};
use tokio::io::AsyncReadExt;

use super::context::Transport;

/// PDU type of P-DATA-TF (PS3.8 9.3.5).
const P_DATA_TF: u8 = 0x04;
/// PDU type, a reserved byte and the 4-byte PDU length (PS3.8 9.3.1).
const PDU_HEADER_LEN: usize = 6;
/// Item length (4 bytes), presentation context ID, message control header
/// (PS3.8 9.3.5.1, E.2).
const PDV_HEADER_LEN: usize = 6;

/// What the next read from an association brought.
pub(super) enum Received {
    /// A complete P-DATA-TF PDU whose PDV items have been checked.
    PData(PData),
    /// Any other PDU, parsed by dicom-ul.
    Other(Pdu),
}

/// Why a PDU could not be read.
#[derive(Debug)]
pub(super) enum Error {
    /// The peer closed the connection.
    Closed,
    /// A P-DATA-TF PDU longer than the node's maximum PDU length.
    TooLarge {
        length: u32,
        max: u32,
    },
    /// A PDV item that does not fit its PDU.
    Malformed(&'static str),
    Io(std::io::Error),
    /// dicom-ul's reader failed on another PDU.
    Ul(dicom_ul::association::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => write!(f, "connection closed"),
            Error::TooLarge { length, max } => write!(
                f,
                "P-DATA-TF PDU of {length} bytes exceeds the maximum PDU length {max}"
            ),
            Error::Malformed(why) => write!(f, "malformed P-DATA-TF PDU: {why}"),
            Error::Io(e) => write!(f, "cannot read PDU: {e}"),
            Error::Ul(e) => write!(f, "{e}"),
        }
    }
}

impl Error {
    pub(super) fn is_closed(&self) -> bool {
        match self {
            Error::Closed => true,
            Error::Ul(e) => matches!(e, dicom_ul::association::Error::ConnectionClosed { .. }),
            _ => false,
        }
    }
}

/// The body of a P-DATA-TF PDU (its presentation data value items), split
/// off the association's read buffer without a copy. Dropping it before the
/// next read lets the buffer take its memory back.
pub(super) struct PData {
    body: BytesMut,
}

/// One presentation data value: a fragment of a command set or data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pdv<'a> {
    pub presentation_context_id: u8,
    /// Bit 0 of the message control header: a command set fragment.
    pub is_command: bool,
    /// Bit 1: the last fragment of its command set or data set.
    pub is_last: bool,
    pub data: &'a [u8],
}

impl PData {
    /// Checks every item, as dicom-ul does before it hands out a PDU: an
    /// item must hold at least its context ID and control header and must
    /// end inside the PDU.
    fn check(body: &[u8]) -> Result<(), Error> {
        let mut rest = body;
        while !rest.is_empty() {
            if rest.len() < PDV_HEADER_LEN {
                return Err(Error::Malformed("PDV item shorter than its header"));
            }
            let item_length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if item_length < 2 {
                return Err(Error::Malformed("PDV item length below 2"));
            }
            rest = rest
                .get(4 + item_length..)
                .ok_or(Error::Malformed("PDV item runs past the end of its PDU"))?;
        }
        Ok(())
    }

    /// The PDV items, in order.
    pub(super) fn values(&self) -> impl Iterator<Item = Pdv<'_>> {
        let mut rest: &[u8] = &self.body;
        std::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            // Checked when the PDU was read: the item fits.
            let item_length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let control = rest[5];
            let value = Pdv {
                presentation_context_id: rest[4],
                is_command: control & 0x01 != 0,
                is_last: control & 0x02 != 0,
                data: &rest[PDV_HEADER_LEN..4 + item_length],
            };
            rest = &rest[4 + item_length..];
            Some(value)
        })
    }
}

/// Reads the next PDU of the association. A P-DATA-TF PDU lands in the
/// association's read buffer (grown once to the maximum PDU length, then
/// reused); others go through dicom-ul's reader.
pub(super) async fn receive<S: Transport>(
    association: &mut AsyncServerAssociation<S>,
    max_pdu_length: u32,
) -> Result<Received, Error> {
    let (stream, buffer) = association.get_mut();
    while buffer.len() < PDU_HEADER_LEN {
        read_more(stream, buffer, PDU_HEADER_LEN).await?;
    }
    if buffer[0] != P_DATA_TF {
        return association
            .receive()
            .await
            .map(Received::Other)
            .map_err(Error::Ul);
    }
    let length = u32::from_be_bytes([buffer[2], buffer[3], buffer[4], buffer[5]]);
    // As dicom-ul's strict mode: refused before a byte of the body is read.
    if length > max_pdu_length {
        return Err(Error::TooLarge {
            length,
            max: max_pdu_length,
        });
    }
    let total = PDU_HEADER_LEN + length as usize;
    while buffer.len() < total {
        read_more(stream, buffer, total).await?;
    }
    let mut body = buffer.split_to(total);
    body.advance(PDU_HEADER_LEN);
    PData::check(&body)?;
    Ok(Received::PData(PData { body }))
}

/// Reads what the socket has into the buffer, making room for at least
/// `want` bytes in all. `reserve` reuses the buffer's memory once the PDU
/// split off it earlier has been dropped (bytes' `BytesMut` reclaims a
/// uniquely owned allocation), so a steady stream of PDUs allocates nothing.
async fn read_more<S: Transport>(
    stream: &mut S,
    buffer: &mut BytesMut,
    want: usize,
) -> Result<(), Error> {
    // Read in large steps: a whole PDU, or a good part of it, per call.
    const READ_AHEAD: usize = 64 * 1024;
    let room = want.saturating_sub(buffer.len()).max(READ_AHEAD);
    if buffer.capacity() - buffer.len() < room {
        buffer.reserve(room);
    }
    match stream.read_buf(buffer).await {
        Ok(0) => Err(Error::Closed),
        Ok(_) => Ok(()),
        Err(e) => Err(Error::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pcid: u8, control: u8, data: &[u8]) -> Vec<u8> {
        let mut v = ((data.len() + 2) as u32).to_be_bytes().to_vec();
        v.push(pcid);
        v.push(control);
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn items_are_checked_and_split_without_copy() {
        let mut body = item(1, 0x03, b"command");
        body.extend(item(3, 0x00, b"data"));
        body.extend(item(3, 0x02, b""));
        PData::check(&body).unwrap();
        let pdata = PData {
            body: BytesMut::from(&body[..]),
        };
        let values: Vec<_> = pdata.values().collect();
        assert_eq!(values.len(), 3);
        assert_eq!(
            values[0],
            Pdv {
                presentation_context_id: 1,
                is_command: true,
                is_last: true,
                data: b"command"
            }
        );
        assert_eq!(values[1].data, b"data");
        assert!(!values[1].is_command && !values[1].is_last);
        assert!(values[2].is_last && values[2].data.is_empty());
    }

    #[test]
    fn malformed_items() {
        let good = item(1, 0x02, b"abcd");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short header", good[..5].to_vec()),
            ("length below 2", vec![0, 0, 0, 1, 1, 2]),
            ("past the end", good[..good.len() - 1].to_vec()),
            ("trailing bytes", [good.clone(), vec![0, 0]].concat()),
            ("huge length", vec![0xFF, 0xFF, 0xFF, 0xFF, 1, 2]),
        ];
        for (name, body) in cases {
            assert!(PData::check(&body).is_err(), "{name}");
        }
        assert!(PData::check(&[]).is_ok(), "an empty P-DATA-TF is read");
    }
}
