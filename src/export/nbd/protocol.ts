/**
 * NBD wire constants (fixed newstyle handshake, simple and structured replies), named as in
 * the NBD protocol document (`specs/nbd-proto.md`, sections cited per group), and the map from
 * block-layer errnos to the NBD error values a client may see.
 */
import type { ErrnoCode } from '../../block/error.js';

// "Newstyle negotiation" / "Fixed newstyle negotiation"
export const NBDMAGIC = 0x4e42444d41474943n; // 'NBDMAGIC', the INIT_PASSWD
export const IHAVEOPT = 0x49484156454f5054n; // 'IHAVEOPT'
export const IHAVEOPT_HI = 0x49484156;
export const IHAVEOPT_LO = 0x454f5054;
export const REP_MAGIC_HI = 0x0003e889; // 0x3e889045565a9, option replies
export const REP_MAGIC_LO = 0x045565a9;

// "Handshake flags" / "Client flags"
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// "Transmission flags"
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;

// "Option types"
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

// "Option reply types"
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_ERR_UNSUP = 0x80000001;
export const REP_ERR_POLICY = 0x80000002;
export const REP_ERR_INVALID = 0x80000003;
export const REP_ERR_UNKNOWN = 0x80000006;
export const REP_ERR_SHUTDOWN = 0x80000007;
export const REP_ERR_TOO_BIG = 0x80000009;

// NBD_REP_INFO types
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// "Request message" / "Simple reply message" / "Structured reply chunk message"
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const REQUEST_HEADER = 28;
export const SIMPLE_REPLY_HEADER = 16;
export const CHUNK_HEADER = 20;

// "Request types"
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;

// "Command flags"
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/** Command flags each command accepts (FUA is valid on every command: "Command flags"). */
export const VALID_FLAGS: readonly number[] = [
  /* READ */ CMD_FLAG_FUA | CMD_FLAG_DF,
  /* WRITE */ CMD_FLAG_FUA,
  /* DISC */ CMD_FLAG_FUA,
  /* FLUSH */ CMD_FLAG_FUA,
  /* TRIM */ CMD_FLAG_FUA,
  /* CACHE */ CMD_FLAG_FUA,
  /* WRITE_ZEROES */ CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
  /* BLOCK_STATUS */ CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
];

// "Structured reply flags" / "Structured reply types"
export const REPLY_FLAG_DONE = 1 << 0;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = 0x8001;

// `base:allocation` flags
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

// "Error values"
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Block-layer errno code to NBD error ("Error values": EDQUOT and EFBIG become ENOSPC). */
export function nbdErrno(code: ErrnoCode | string): number {
  switch (code) {
    case 'EPERM': case 'EROFS': case 'EACCES': return NBD_EPERM;
    case 'ENOMEM': return NBD_ENOMEM;
    case 'EINVAL': return NBD_EINVAL;
    case 'ENOSPC': case 'EDQUOT': case 'EFBIG': return NBD_ENOSPC;
    case 'ENOTSUP': return NBD_ENOTSUP;
    case 'EOVERFLOW': return NBD_EOVERFLOW;
    case 'ESHUTDOWN': return NBD_ESHUTDOWN;
    default: return NBD_EIO;
  }
}

/** Largest READ/WRITE payload we accept and advertise ("Size constraints"). */
export const MAX_PAYLOAD = 32 << 20;
/** Option data beyond this is a denial of service: hard disconnect. */
export const MAX_OPTION_DATA = 1 << 16;
/** Strings (names, descriptions, queries) are at most 4096 bytes ("Conventions"). */
export const MAX_STRING = 4096;

export const META_BASE_ALLOCATION = 'base:allocation';
export const META_ALLOCATION_DEPTH = 'qemu:allocation-depth';
