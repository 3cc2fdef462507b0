/* fod_sd_int.h: what fanoutd's main (fanoutd.c) uses of sd_notify.c. Host concerns: not part
 * of the daemon library (fo_core). */
#ifndef FANOUT_FOD_SD_INT_H
#define FANOUT_FOD_SD_INT_H

#include <stdint.h>

/*
 * The systemd notification protocol (sd_notify.c), for fanoutd.c. fod_sd_open reads nothing
 * from the environment itself: the caller passes NOTIFY_SOCKET's value (NULL or empty: every
 * notify is a no-op). fod_sd_notify sends one datagram without ever blocking.
 */
typedef struct fod_sd fod_sd_t;
fod_sd_t *fod_sd_open(const char *notify_socket);
int fod_sd_enabled(const fod_sd_t *sd);
void fod_sd_notify(fod_sd_t *sd, const char *msg);
/* The watchdog interval in microseconds from WATCHDOG_USEC and WATCHDOG_PID's values;
 * 0 when off, malformed, or meant for another process. */
uint64_t fod_sd_watchdog_usec(const char *usec, const char *pid);
void fod_sd_close(fod_sd_t *sd);

#endif
