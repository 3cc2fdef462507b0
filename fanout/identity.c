/*
 * identity.c: who this worker is, and its row in fanout.workers.
 *
 * A worker's id is the lease owner name of every job it claims, and a claim takes back the
 * leases held under its own id that it is not running (a restarted worker resumes its own
 * jobs at once instead of waiting for their leases to expire). That is only safe while one
 * live process holds the id, so the id is held as a session advisory lock on the control
 * connection: PostgreSQL drops it when the session ends, however the process ended. Nothing
 * is claimed until the lock is held; it is taken again after every reconnect.
 *
 * When another session holds the lock, the workers row says whose it is (host, pid, since
 * when, last heartbeat):
 *   - same host and that pid is gone, or that pid is this process (its previous control
 *     connection, lost on this side but not yet on the server's): the previous holder is
 *     provably gone, so its session is ended (pg_terminate_backend, allowed on the role's
 *     own sessions) and the lock asked for again shortly;
 *   - a live process, or one that heartbeated within two leases: refused, one line naming
 *     it and the fix, and fanoutd exits with a status systemd does not restart;
 *   - otherwise (the holder stopped heartbeating on another host): not provably gone, so
 *     wait for PostgreSQL to drop its session, saying so once.
 * Without a configured worker_id the id is the host name plus a random suffix, unique per
 * process, so two daemons on one host never share one (fanoutd's main makes it).
 *
 * An object of its own: the daemon calls it; it answers through fod_identity_events_t.
 */
#include "fanout/fod_int.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ASK_AGAIN_MS 250
#define WAIT_LOG_MS 60000

enum { ID_NONE, ID_ASKING, ID_HELD };

struct fod_identity {
    pgc_conn_t *ctl;
    const cfg_t *cfg;
    fod_identity_events_t ev;
    char worker_id[256];
    char host[256];
    int pid;
    int state; /* ID_* */
    uint64_t retry_at, logged_at;
};

/* $1 worker id, $2 host, $3 pid. Takes the id's lock; on success (re)writes the row; returns
 * whether the lock was got and the row as it was before. */
static const char SQL_IDENTITY[] =
    "WITH l AS (SELECT pg_try_advisory_lock(hashtext('fanout.worker'), hashtext($1)) AS got),"
    " old AS (SELECT host, pid, started_at, seen_at FROM fanout.workers WHERE worker_id = $1),"
    " up AS (INSERT INTO fanout.workers AS w (worker_id, host, pid)"
    "        SELECT $1, $2, $3::int FROM l WHERE l.got"
    "        ON CONFLICT (worker_id) DO UPDATE SET host = $2, pid = $3::int,"
    "          started_at = now(), seen_at = now(), jobs = 0, paused_reason = NULL"
    "        RETURNING 1)"
    " SELECT l.got::int, (SELECT count(*) FROM up), coalesce(old.host, ''),"
    "   coalesce(old.pid, 0),"
    "   coalesce(to_char(old.started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),"
    "            '(unknown)'),"
    "   coalesce((extract(epoch FROM now() - old.seen_at) * 1000)::bigint, -1)"
    " FROM l LEFT JOIN old ON true";

/* Ends the sessions holding $1's lock, other than this one; the caller knows the process
 * that opened them is gone. Only idle ones: a session running a statement may be a new
 * holder inside its own fo_identity, whose row (read before it commits) still names the
 * dead one; once it commits, its row names it and it is refused, never ended. */
static const char SQL_IDENTITY_FREE[] =
    "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
    " JOIN pg_stat_activity a ON a.pid = l.pid AND a.state IS DISTINCT FROM 'active'"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
    "   AND l.classid = hashtext('fanout.worker')::oid AND l.objid = hashtext($1)::oid"
    "   AND l.pid <> pg_backend_pid()";

/* The heartbeat: $1 worker, $2 jobs, $3 paused reason or NULL, $4 host, $5 pid. */
static const char SQL_WORKER[] =
    "INSERT INTO fanout.workers (worker_id, jobs, paused_reason, host, pid)"
    " VALUES ($1, $2, $3, $4, $5::int)"
    " ON CONFLICT (worker_id) DO UPDATE SET seen_at = now(), jobs = $2, paused_reason = $3,"
    "   host = $4, pid = $5::int";

fod_identity_t *fod_identity_new(pgc_conn_t *ctl, const cfg_t *cfg, const fod_host_t *host,
                                 const fod_identity_events_t *events)
{
    fod_identity_t *d = fo_xcalloc(1, sizeof *d);
    d->ctl = ctl;
    d->cfg = cfg;
    d->ev = *events;
    snprintf(d->worker_id, sizeof d->worker_id, "%s", host->worker_id);
    snprintf(d->host, sizeof d->host, "%s", host->host);
    d->pid = host->pid;
    pgc_conn_prepare(ctl, "fo_identity", SQL_IDENTITY, 3);
    pgc_conn_prepare(ctl, "fo_identity_free", SQL_IDENTITY_FREE, 1);
    pgc_conn_prepare(ctl, "fo_worker", SQL_WORKER, 5);
    return d;
}

void fod_identity_free(fod_identity_t *d)
{
    free(d);
}

int fod_identity_held(const fod_identity_t *d)
{
    return d->state == ID_HELD;
}

const char *fod_identity_worker(const fod_identity_t *d)
{
    return d->worker_id;
}

static void on_identity(int status, const PGresult *res, void *data);

static void ask(fod_identity_t *d)
{
    char pid[16];
    snprintf(pid, sizeof pid, "%d", d->pid);
    const char *params[] = {d->worker_id, d->host, pid};
    if (pgc_conn_exec(d->ctl, "fo_identity", 3, params, 0, on_identity, d) == 0)
        d->state = ID_ASKING;
}

/* 1 when the process holding the lock is provably gone: on this host, and no such pid or
 * this very process (a session of a control connection it has since replaced). */
static int holder_gone(const fod_identity_t *d, const char *host, int pid)
{
    if (pid <= 0 || strcmp(host, d->host) != 0)
        return 0;
    return pid == d->pid || (kill(pid, 0) < 0 && errno == ESRCH);
}

static void on_identity_freed(int status, const PGresult *res, void *data)
{
    fod_identity_t *d = data;
    if (status == 0 && strcmp(PQgetvalue(res, 0, 0), "0") != 0)
        fo_log(FO_LOG_INFO, "ended the session of the previous holder of this worker_id",
               "worker=%s sessions=%s", d->worker_id, PQgetvalue(res, 0, 0));
}

static void on_identity(int status, const PGresult *res, void *data)
{
    fod_identity_t *d = data;
    if (status == FO_ESTOP)
        return;
    d->state = ID_NONE;
    if (status < 0) {
        char what[512];
        fo_log_quote(what, sizeof what, res ? PQresultErrorMessage(res) : "connection lost");
        fo_log(FO_LOG_WARN, "worker identity not taken; retrying", "error=%s", what);
        d->retry_at = fo_now_ms() + 1000;
        return;
    }
    if (strcmp(PQgetvalue(res, 0, 0), "1") == 0) {
        d->state = ID_HELD;
        fo_log(FO_LOG_INFO, "worker identity held", "worker=%s host=%s pid=%d", d->worker_id,
               d->host, d->pid);
        d->ev.held(d->ev.ctx);
        return;
    }
    const char *host = PQgetvalue(res, 0, 2), *since = PQgetvalue(res, 0, 4);
    long long pid_value = 0, seen_ms = -1; /* -1: never seen */
    if (fo_parse_int(PQgetvalue(res, 0, 3), 0, INT32_MAX, &pid_value) < 0)
        pid_value = 0;
    int pid = (int)pid_value;
    if (fo_parse_int(PQgetvalue(res, 0, 5), -1, INT64_MAX, &seen_ms) < 0)
        seen_ms = -1;
    uint64_t now = fo_now_ms();
    if (holder_gone(d, host, pid)) {
        const char *params[] = {d->worker_id};
        pgc_conn_exec(d->ctl, "fo_identity_free", 1, params, 0, on_identity_freed, d);
        d->retry_at = now + ASK_AGAIN_MS;
        return;
    }
    int alive_here = pid > 0 && strcmp(host, d->host) == 0 && kill(pid, 0) == 0;
    if (alive_here || (seen_ms >= 0 && seen_ms < 2LL * d->cfg->lease_ms)) {
        fo_log(FO_LOG_ERROR,
               "worker_id is already held by another live fanoutd; refusing to run. fix: give "
               "each fanoutd its own FANOUT_WORKER_ID, or leave it empty for a unique one",
               "worker=%s other_host=%s other_pid=%d other_since=%s other_seen_ms_ago=%lld",
               d->worker_id, host[0] ? host : "(unknown)", pid, since, seen_ms);
        d->ev.refused(d->ev.ctx);
        return;
    }
    if (now >= d->logged_at + WAIT_LOG_MS || !d->logged_at) {
        d->logged_at = now;
        fo_log(FO_LOG_WARN,
               "worker_id is locked by a PostgreSQL session whose fanoutd stopped heartbeating; "
               "waiting for PostgreSQL to drop it (or end that session with pg_terminate_backend)",
               "worker=%s other_host=%s other_pid=%d other_since=%s other_seen_ms_ago=%lld",
               d->worker_id, host[0] ? host : "(unknown)", pid, since, seen_ms);
    }
    d->retry_at = now + 1000;
}

void fod_identity_check(fod_identity_t *d)
{
    if (d->state == ID_NONE && pgc_conn_ready(d->ctl) && fo_now_ms() >= d->retry_at)
        ask(d);
}

void fod_identity_lost(fod_identity_t *d)
{
    /* the lock went with the session; until it is held again nothing is claimed */
    d->state = ID_NONE;
    d->retry_at = 0;
}

static void on_worker_row(int status, const PGresult *res, void *data)
{
    if (status == FO_EPG && res) {
        char what[512];
        fo_log_quote(what, sizeof what, PQresultErrorMessage(res));
        fo_log(FO_LOG_WARN, "worker row not written", "error=%s", what);
    }
}

void fod_identity_heartbeat(fod_identity_t *d, int jobs, const char *paused)
{
    if (d->state != ID_HELD)
        return; /* the row may be another live process's: never overwrite it */
    char njobs[16], pid[16];
    snprintf(njobs, sizeof njobs, "%d", jobs);
    snprintf(pid, sizeof pid, "%d", d->pid);
    const char *params[] = {d->worker_id, njobs, paused, d->host, pid};
    pgc_conn_exec(d->ctl, "fo_worker", 5, params, 0, on_worker_row, NULL);
}
