//! The NBD protocol's numbers (fixed newstyle handshake, simple replies),
//! as in `doc/proto.md` of the NetworkBlockDevice/nbd project. Every
//! integer on the wire is big-endian.

/// `NBDMAGIC`, first in the server's greeting.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second in the greeting, and first in every option request.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First in every option reply.
pub(crate) const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// First in every transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// First in every simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags: fixed newstyle.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flags: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags the server knows: fixed newstyle, no zeroes.
pub(crate) const CLIENT_FLAGS_KNOWN: u32 = 0b11;
/// Client flag: no zeroes.
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_LIST: u32 = 3;
pub(crate) const OPT_INFO: u32 = 6;
pub(crate) const OPT_GO: u32 = 7;

/// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_SERVER: u32 = 2;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub(crate) const REP_ERR_INVALID: u32 = 0x8000_0003;
pub(crate) const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

/// Information types in `NBD_REP_INFO`.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_NAME: u16 = 1;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// A FLUSH on one connection covers writes completed on every connection:
/// true here, since all connections to an export write to one volume and
/// a barrier covers everything the volume took before it.
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Errors in simple replies (errno values).
pub(crate) const EPERM: u32 = 1;
pub(crate) const EIO: u32 = 5;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSPC: u32 = 28;
pub(crate) const ESHUTDOWN: u32 = 108;

/// The advertised minimum block size: requests must be aligned to it.
pub(crate) const MIN_BLOCK: u32 = walship_io::BLOCK_SIZE as u32;
/// The advertised maximum block size (the spec's advice: no client needs
/// more, and less than this should not be treated as an attack).
pub(crate) const MAX_BLOCK: u32 = 32 << 20;
/// Option data longer than this is an attack, not a request: the
/// connection is closed (names are at most 4 KiB).
pub(crate) const MAX_OPTION: u32 = 64 << 10;
