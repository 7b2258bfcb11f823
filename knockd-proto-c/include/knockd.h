/* knockd's knock protocol for C firmware (docs/PROTOCOL.md).
 * Generated from knockd-proto-c/src/lib.rs by `cargo xtask header`: do not edit.
 * Link with libknockd_proto_c.a; see knockd-proto-c/examples/knock.c. */

#ifndef KNOCKD_H
#define KNOCKD_H

#include <stddef.h>
#include <stdint.h>

/**
 * Bytes a [`KnockdDoorKeys`] holds: room for the derived keys, whatever
 * the target's layout of them.
 */
#define KNOCKD_DOOR_KEYS_SIZE 512

/**
 * Length of a device key.
 */
#define KNOCKD_KEY_LEN 32

/**
 * Length of a sequence nonce: fresh random bytes for every sequence.
 */
#define KNOCKD_NONCE_LEN 16

/**
 * Length of a knock payload (one UDP datagram).
 */
#define KNOCKD_KNOCK_LEN 68

/**
 * Length of a sealed reply.
 */
#define KNOCKD_REPLY_LEN 50

/**
 * [`KNOCKD_DOOR_KEYS_SIZE`] in 8-byte words.
 */
#define KNOCKD_DOOR_KEYS_WORDS 64

/**
 * What a call did. Every failure leaves the outputs untouched.
 */
typedef enum KnockdResult {
  KnockdOk = 0,
  /**
   * A required pointer was NULL, or a number out of its range (a kind,
   * an index past the sequence, an empty or reversed port range).
   */
  KnockdErrArgument = -1,
  /**
   * The door name is longer than 64 bytes.
   */
  KnockdErrDoorName = -2,
  /**
   * The reply is not 50 bytes.
   */
  KnockdErrReplyLength = -3,
  /**
   * The reply's version or kind byte is not a reply's.
   */
  KnockdErrReplyHeader = -4,
  /**
   * The reply answers another sequence (nonce).
   */
  KnockdErrReplyNonce = -5,
  /**
   * The reply does not verify: not from a server holding this key, or
   * altered on the way. Ignore it and keep waiting.
   */
  KnockdErrReplySeal = -6,
  /**
   * The reply carries a status this version does not know.
   */
  KnockdErrReplyStatus = -7,
} KnockdResult;

/**
 * What a message asks for.
 */
typedef enum KnockdKind {
  KnockdOpen = 1,
  KnockdClose = 2,
  KnockdHeartbeat = 3,
} KnockdKind;

/**
 * What a reply says.
 */
typedef enum KnockdStatus {
  /**
   * The door is open for this device: `port`, for `expires_in_secs`.
   */
  KnockdGranted = 0,
  /**
   * Its grant is closed.
   */
  KnockdClosed = 1,
  /**
   * A heartbeat for which it holds no grant.
   */
  KnockdNoGrant = 2,
} KnockdStatus;

/**
 * A door's derived keys, owned by the caller. Its contents are opaque;
 * fill it with `knockd_door_keys_derive` before any other use. Words, so
 * that it is aligned as the keys inside need, in C as in Rust.
 */
typedef struct KnockdDoorKeys {
  uint64_t opaque[KNOCKD_DOOR_KEYS_WORDS];
} KnockdDoorKeys;

/**
 * What a one-time door asks of a client (the server's door settings; a
 * profile's `knock_ports`, `knocks` and `step_secs`).
 */
typedef struct KnockdDoor {
  /**
   * The knock-port range: first and last port, inclusive.
   */
  uint16_t knock_port_first;
  uint16_t knock_port_last;
  /**
   * Knocks in an open sequence (1 to 16).
   */
  uint8_t knocks;
  /**
   * The time step in seconds.
   */
  uint32_t step_secs;
} KnockdDoor;

/**
 * An opened reply.
 */
typedef struct KnockdReply {
  /**
   * The kind of knock it answers.
   */
  enum KnockdKind kind;
  enum KnockdStatus status;
  /**
   * The port to connect to (0 when nothing is open).
   */
  uint16_t port;
  /**
   * Seconds left to open new connections on `port`.
   */
  uint32_t expires_in_secs;
  /**
   * The server's clock, Unix milliseconds (to see this clock's skew).
   */
  uint64_t server_time_ms;
} KnockdReply;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Derives the keys of the device `key` (32 bytes) for the door named by
 * the `door_len` bytes at `door` (no terminating NUL needed) into `out`.
 *
 * # Safety
 * `key` points to 32 readable bytes, `door` to `door_len` readable bytes,
 * and `out` to a writable `KnockdDoorKeys`; any may be NULL (an error).
 */
enum KnockdResult knockd_door_keys_derive(const uint8_t *key,
                                          const uint8_t *door,
                                          size_t door_len,
                                          struct KnockdDoorKeys *out);

/**
 * How many knocks a sequence of `kind` has on `door`: its `knocks` for an
 * open, 1 for a close or a heartbeat; 0 if an argument is invalid.
 *
 * # Safety
 * `door` points to a readable `KnockdDoor`, or is NULL (0).
 */
uint8_t knockd_sequence_length(const struct KnockdDoor *door, uint32_t kind);

/**
 * Builds knock `index` (from 0) of the sequence of `kind` at the time
 * `now_ms` (Unix milliseconds) with the sequence's `nonce` (16 fresh
 * random bytes, the same for every knock of one sequence): the UDP port to
 * send it to in `port_out`, its 68 bytes in `payload_out`. `bind` is NULL
 * (the grant is for the address the knocks come from) or the 16 bytes of
 * an IPv6 address (an IPv4 one mapped, `::ffff:a.b.c.d`) the grant is for.
 *
 * # Safety
 * `keys` was filled by `knockd_door_keys_derive`; `door` is readable;
 * `nonce` has 16 readable bytes, `bind` 16 or is NULL; `port_out` and
 * `payload_out` (68 bytes) are writable. NULL where not allowed is an
 * error.
 */
enum KnockdResult knockd_knock(const struct KnockdDoorKeys *keys,
                               const struct KnockdDoor *door,
                               uint32_t kind,
                               uint64_t now_ms,
                               const uint8_t *nonce,
                               const uint8_t *bind,
                               uint8_t index,
                               uint16_t *port_out,
                               uint8_t *payload_out);

/**
 * Opens the `len` bytes of a datagram that came back as the reply to the
 * sequence `nonce`, authenticating the server; fills `out` on success.
 * Any error but `KnockdOk` means: not (yet) the answer, keep waiting.
 *
 * # Safety
 * `keys` was filled by `knockd_door_keys_derive`; `bytes` has `len`
 * readable bytes; `nonce` 16; `out` is writable. NULL is an error.
 */
enum KnockdResult knockd_reply_open(const struct KnockdDoorKeys *keys,
                                    const uint8_t *bytes,
                                    size_t len,
                                    const uint8_t *nonce,
                                    struct KnockdReply *out);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* KNOCKD_H */
