/*
 * sd_notify.c: the systemd notification protocol, spoken directly.
 *
 * systemd passes NOTIFY_SOCKET (a path, or '@' for an abstract socket) and, with WatchdogSec,
 * WATCHDOG_USEC (and WATCHDOG_PID). A notification is one datagram of "KEY=VALUE" lines.
 * We speak it ourselves instead of linking libsystemd: the protocol is these few lines,
 * and libsystemd's sd_notify sends on a blocking socket (a full receive queue would block
 * the loop), while this socket is non-blocking and a datagram that does not fit is dropped
 * (the next STATUS= or WATCHDOG=1 follows within seconds). Without NOTIFY_SOCKET every call
 * is a no-op, so fanoutd runs the same outside systemd.
 */
#include "fanout/fod_sd_int.h"

#include "common/common.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

struct fod_sd {
    int fd;
    struct sockaddr_un addr;
    socklen_t addr_len;
    int warned;
};

fod_sd_t *fod_sd_open(const char *notify_socket)
{
    fod_sd_t *sd = fo_xcalloc(1, sizeof *sd);
    sd->fd = -1;
    size_t n = notify_socket ? strlen(notify_socket) : 0;
    if (n == 0)
        return sd;
    if ((notify_socket[0] != '/' && notify_socket[0] != '@') || n >= sizeof sd->addr.sun_path) {
        fo_log(FO_LOG_WARN,
               "NOTIFY_SOCKET is neither an absolute path nor @abstract; not notifying", NULL);
        return sd;
    }
    sd->addr.sun_family = AF_UNIX;
    memcpy(sd->addr.sun_path, notify_socket, n);
    if (notify_socket[0] == '@')
        sd->addr.sun_path[0] = '\0'; /* abstract namespace: no terminating NUL counted */
    sd->addr_len =
        (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (notify_socket[0] == '/' ? 1 : 0));
    sd->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (sd->fd < 0)
        fo_log(FO_LOG_WARN, "cannot open the systemd notification socket", "error=\"%s\"",
               strerror(errno));
    return sd;
}

int fod_sd_enabled(const fod_sd_t *sd)
{
    return sd && sd->fd >= 0;
}

void fod_sd_notify(fod_sd_t *sd, const char *msg)
{
    if (!fod_sd_enabled(sd))
        return;
    ssize_t n = sendto(sd->fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT,
                       (const struct sockaddr *)&sd->addr, sd->addr_len);
    if (n < 0 && !sd->warned) {
        sd->warned = 1; /* once: a missing listener must not flood the log */
        fo_log(FO_LOG_WARN, "systemd notification not sent", "error=\"%s\"", strerror(errno));
    }
}

uint64_t fod_sd_watchdog_usec(const char *usec, const char *pid)
{
    if (!usec || !*usec)
        return 0;
    long long v;
    if (pid && *pid && (fo_parse_int(pid, 1, INT32_MAX, &v) < 0 || v != (long long)getpid()))
        return 0; /* meant for another process (a wrapper's child) */
    if (fo_parse_int(usec, 0, INT64_MAX, &v) < 0)
        return 0;
    return (uint64_t)v;
}

void fod_sd_close(fod_sd_t *sd)
{
    if (!sd)
        return;
    if (sd->fd >= 0)
        close(sd->fd);
    free(sd);
}
