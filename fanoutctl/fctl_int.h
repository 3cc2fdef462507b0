/*
 * fctl_int.h: what fanoutctl's files share: the exit codes and one-line error reporting
 * (fanoutctl.c), option parsing (fanoutctl.c), the blocking Redis helpers (fctl_redis.c)
 * and the commands kept in files of their own (consume.c, trim.c).
 */
#ifndef FANOUT_FCTL_INT_H
#define FANOUT_FCTL_INT_H

#include <hiredis/hiredis.h>

#include "config/config.h"

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2 };

/* One line on stderr: "fanoutctl: <cmd>: <message>" (first line of the message only). */
void fail(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A command's own options: --name VALUE or --name=VALUE, each at most once; a flag is
 * --name alone and gets the value "1". */
typedef struct opt {
    const char *name; /* without the leading dashes */
    const char **value;
    int flag; /* takes no value */
} opt_t;

/* --help, -h or help. */
int is_help(const char *a);

/*
 * Fills the options from args; returns 0, 1 when --help was asked for, or EXIT_USAGE after
 * printing one line about an unknown option, a missing value or a stray argument.
 */
int parse_opts(const char *cmd, int argc, char **argv, opt_t *opts, size_t nopts,
               const char **positional);

/* Connects (5 s timeout) and authenticates with cfg's Redis settings; NULL after one line
 * on stderr naming cmd. The password is never printed. */
redisContext *fctl_redis_connect(const cfg_t *cfg, const char *cmd);

/* Runs one command; returns the reply (caller frees) or NULL after one line on stderr. A
 * Redis error reply is returned as is when keep_error is set. */
redisReply *fctl_redis_run(redisContext *c, const char *cmd, int argc, const char **argv,
                           int keep_error);

int cmd_consume(const cfg_t *cfg, int argc, char **argv);
int cmd_trim(const cfg_t *cfg, int argc, char **argv);

#endif
