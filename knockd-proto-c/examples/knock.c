/*
 * What a device written in C does to knock, with libknockd_proto_c.a:
 * derive the door's keys once, build each knock of a sequence, open the
 * server's sealed reply. On a device the knocks go out as UDP datagrams
 * and the reply comes back on the same socket; here the inputs come from
 * the command line (a vector of docs/PROTOCOL.md §11) and the results are
 * printed as that vector writes them, so `cargo xtask test` can check them:
 *
 *   knock KEY DOOR FIRST LAST KNOCKS STEP_SECS KIND TIME_MS NONCE BIND REPLY
 *
 * KEY, NONCE, REPLY: hex; BIND: 32 hex digits (an IPv6 address, IPv4
 * mapped) or "none"; KIND: open, close or heartbeat.
 *
 * Build: cc -std=c99 -I include examples/knock.c libknockd_proto_c.a
 *        -lpthread -ldl -lm
 * (a bare-metal build of the library needs none of the -l flags).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "knockd.h"

/* Decodes exactly `len` bytes of hex from `text`; 0 on success. */
static int unhex(const char *text, uint8_t *out, size_t len) {
    if (strlen(text) != 2 * len) {
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        unsigned int byte;
        if (sscanf(text + 2 * i, "%2x", &byte) != 1) {
            return -1;
        }
        out[i] = (uint8_t)byte;
    }
    return 0;
}

static int kind_of(const char *name) {
    if (strcmp(name, "open") == 0) return KnockdOpen;
    if (strcmp(name, "close") == 0) return KnockdClose;
    if (strcmp(name, "heartbeat") == 0) return KnockdHeartbeat;
    return 0;
}

static const char *status_name(KnockdStatus status) {
    switch (status) {
    case KnockdGranted: return "granted";
    case KnockdClosed: return "closed";
    case KnockdNoGrant: return "no_grant";
    }
    return "?";
}

int main(int argc, char **argv) {
    if (argc != 12) {
        fprintf(stderr, "usage: knock KEY DOOR FIRST LAST KNOCKS STEP_SECS KIND TIME_MS NONCE BIND REPLY\n");
        return 2;
    }
    uint8_t key[KNOCKD_KEY_LEN], nonce[KNOCKD_NONCE_LEN], bind[16], reply[KNOCKD_REPLY_LEN];
    const uint8_t *bind_or_null = NULL;
    if (unhex(argv[1], key, sizeof key) || unhex(argv[9], nonce, sizeof nonce)
        || unhex(argv[11], reply, sizeof reply)) {
        fprintf(stderr, "KEY, NONCE and REPLY are hex of 32, 16 and 50 bytes\n");
        return 2;
    }
    if (strcmp(argv[10], "none") != 0) {
        if (unhex(argv[10], bind, sizeof bind)) {
            fprintf(stderr, "BIND is 32 hex digits or none\n");
            return 2;
        }
        bind_or_null = bind;
    }
    KnockdDoor door = {
        .knock_port_first = (uint16_t)atoi(argv[3]),
        .knock_port_last = (uint16_t)atoi(argv[4]),
        .knocks = (uint8_t)atoi(argv[5]),
        .step_secs = (uint32_t)strtoul(argv[6], NULL, 10),
    };
    int kind = kind_of(argv[7]);
    uint64_t now_ms = strtoull(argv[8], NULL, 10);

    /* Once per door; static storage, as firmware would keep it. */
    static KnockdDoorKeys keys;
    KnockdResult r = knockd_door_keys_derive(key, (const uint8_t *)argv[2], strlen(argv[2]), &keys);
    if (r != KnockdOk) {
        fprintf(stderr, "knockd_door_keys_derive: %d\n", (int)r);
        return 1;
    }

    /* Every knock of the sequence, one 68-byte buffer at a time. */
    uint8_t count = knockd_sequence_length(&door, (uint32_t)kind);
    if (count == 0) {
        fprintf(stderr, "bad door settings or kind\n");
        return 1;
    }
    for (uint8_t i = 0; i < count; i++) {
        uint16_t port;
        uint8_t payload[KNOCKD_KNOCK_LEN];
        r = knockd_knock(&keys, &door, (uint32_t)kind, now_ms, nonce, bind_or_null, i, &port, payload);
        if (r != KnockdOk) {
            fprintf(stderr, "knockd_knock %u: %d\n", (unsigned)i, (int)r);
            return 1;
        }
        /* A device sends `payload` to the server's UDP `port` here. */
        printf("port.%u %u\nknock.%u ", (unsigned)i, (unsigned)port, (unsigned)i);
        for (size_t b = 0; b < sizeof payload; b++) {
            printf("%02x", payload[b]);
        }
        printf("\n");
    }

    /* The datagram that came back: only a reply that opens counts. */
    KnockdReply opened;
    r = knockd_reply_open(&keys, reply, sizeof reply, nonce, &opened);
    if (r != KnockdOk) {
        fprintf(stderr, "knockd_reply_open: %d\n", (int)r);
        return 1;
    }
    printf("reply_fields %s %u %lu %llu\n", status_name(opened.status), (unsigned)opened.port,
           (unsigned long)opened.expires_in_secs, (unsigned long long)opened.server_time_ms);
    return 0;
}
