//! The fixed newstyle handshake: greeting, client flags, then options one
//! at a time until the client picks an export (`GO`, `EXPORT_NAME`) or
//! leaves (`ABORT`, EOF).
//!
//! An option the server does not know is read to its end and answered
//! `NBD_REP_ERR_UNSUP`; a malformed one `NBD_REP_ERR_INVALID`. What leaves
//! the stream out of step (a bad magic, an unknown client flag, option data
//! past [`MAX_OPTION`]) closes the connection.

use super::proto::*;
use super::{Export, Exports, NbdError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A client silent this long while negotiating is dropped.
const IDLE: Duration = Duration::from_secs(30);

/// Negotiates; the export to serve, or `None` when the client left.
pub(super) async fn negotiate<R, W>(
    read: &mut R,
    write: &mut W,
    exports: &dyn Exports,
) -> Result<Option<Export>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write.write_u64(NBDMAGIC).await?;
    write.write_u64(IHAVEOPT).await?;
    write
        .write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .await?;
    write.flush().await?;
    let client_flags = idle(read.read_u32()).await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    loop {
        let magic = match idle(read.read_u64()).await {
            Ok(magic) => magic,
            // The client went away between options: nothing was promised.
            Err(NbdError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!("option magic {magic:#x}")));
        }
        let option = idle(read.read_u32()).await?;
        let length = idle(read.read_u32()).await?;
        if length > MAX_OPTION {
            return Err(NbdError::Protocol(format!(
                "option {option} of {length} bytes, more than {MAX_OPTION}"
            )));
        }
        let mut data = vec![0u8; length as usize];
        idle(read.read_exact(&mut data)).await?;
        let mut reply = Replies { write, option };
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // This option has no error reply: an unknown name closes.
                let Some(export) = find(exports, &name) else {
                    return Err(NbdError::Protocol(format!("no export named {name:?}")));
                };
                write.write_u64(export.size).await?;
                write.write_u16(transmission_flags(&export)).await?;
                if !no_zeroes {
                    write.write_all(&[0u8; 124]).await?;
                }
                write.flush().await?;
                return Ok(Some(export));
            }
            OPT_ABORT => {
                // The client may already be gone: a failed ACK is fine.
                let _ = reply.send(REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => {
                reply
                    .error(REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                    .await?;
            }
            OPT_LIST => {
                for name in exports.names() {
                    let mut server = (name.len() as u32).to_be_bytes().to_vec();
                    server.extend_from_slice(name.as_bytes());
                    reply.send(REP_SERVER, &server).await?;
                }
                reply.send(REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    reply
                        .error(REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
                        .await?;
                    continue;
                };
                let Some(export) = find(exports, &name) else {
                    reply
                        .error(REP_ERR_UNKNOWN, &format!("no export named {name:?}"))
                        .await?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                reply.send(REP_INFO, &info).await?;
                // Sent whether asked or not: the server enforces it.
                let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for size in [MIN_BLOCK, MIN_BLOCK, MAX_BLOCK] {
                    sizes.extend_from_slice(&size.to_be_bytes());
                }
                reply.send(REP_INFO, &sizes).await?;
                if requests.contains(&INFO_NAME) {
                    let mut named = INFO_NAME.to_be_bytes().to_vec();
                    named.extend_from_slice(export.name.as_bytes());
                    reply.send(REP_INFO, &named).await?;
                }
                reply.send(REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(Some(export));
                }
            }
            _ => {
                reply
                    .error(REP_ERR_UNSUP, &format!("option {option} is not supported"))
                    .await?;
            }
        }
    }
}

/// The export a client named; the empty name is the default export,
/// which exists when the node exports exactly one volume.
fn find(exports: &dyn Exports, name: &str) -> Option<Export> {
    if name.is_empty() {
        let names = exports.names();
        return match names.as_slice() {
            [only] => exports.export(only),
            _ => None,
        };
    }
    exports.export(name)
}

pub(super) fn transmission_flags(export: &Export) -> u16 {
    let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if export.read_only {
        common | TFLAG_READ_ONLY
    } else {
        common | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
    }
}

/// `NBD_OPT_INFO`/`GO` data: u32 name length, name, u16 count, u16 types.
fn parse_info(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > rest.len() {
        return None;
    }
    let (name, rest) = rest.split_at(len);
    let name = std::str::from_utf8(name).ok()?.to_owned();
    let (count, rest) = rest.split_first_chunk::<2>()?;
    let count = u16::from_be_bytes(*count) as usize;
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Some((name, requests))
}

/// Option replies to one option.
struct Replies<'a, W> {
    write: &'a mut W,
    option: u32,
}

impl<W: AsyncWrite + Unpin> Replies<'_, W> {
    async fn send(&mut self, kind: u32, data: &[u8]) -> std::io::Result<()> {
        self.write.write_u64(REPLY_MAGIC).await?;
        self.write.write_u32(self.option).await?;
        self.write.write_u32(kind).await?;
        self.write.write_u32(data.len() as u32).await?;
        self.write.write_all(data).await?;
        self.write.flush().await
    }

    async fn error(&mut self, kind: u32, message: &str) -> std::io::Result<()> {
        tracing::debug!(option = self.option, kind, message, "nbd option refused");
        self.send(kind, message.as_bytes()).await
    }
}

async fn idle<T>(
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, NbdError> {
    match tokio::time::timeout(IDLE, read).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(NbdError::Protocol(format!(
            "silent for {IDLE:?} while negotiating"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_data_is_parsed_exactly() {
        let mut data = 4u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol0");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info(&data),
            Some(("vol0".into(), vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        // A name longer than the data, a count that does not match, no count.
        let mut long = 99u32.to_be_bytes().to_vec();
        long.extend_from_slice(b"vol0\0\0");
        assert_eq!(parse_info(&long), None);
        assert_eq!(parse_info(&data[..data.len() - 1]), None);
        assert_eq!(parse_info(&data[..8]), None);
        assert_eq!(parse_info(&[0, 0]), None);
    }
}
