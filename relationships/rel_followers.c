/*
 * rel_followers.c: keyset pages of follower ids from the contract view.
 *
 * The statement is prepared on every connect with the view's identifiers quoted by
 * PQescapeIdentifier (they come from configuration). Results come back in binary, so a page
 * of ids is parsed without text conversion straight into the caller's buffer. The session is
 * read-only: fanoutd cannot modify anything through this connection even by mistake.
 */
#include "relationships/rel_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_STMT "fo_followers_page"

typedef struct page_req {
    char why[160]; /* a message of our own, when err is not the server's */
    int64_t *out;
    int limit;
    rel_page_cb cb;
    void *data;
} page_req_t;

int64_t rel__int8_from_binary(const char *v)
{
    const unsigned char *b = (const unsigned char *)v;
    uint64_t x = 0;
    for (int i = 0; i < 8; i++)
        x = (x << 8) | b[i];
    return (int64_t)x;
}

void rel_followers_prepare(rel_conn_t *c, const cfg_t *cfg)
{
    rel_conn_setup(c, "SET default_transaction_read_only = on");
    rel_conn_prepare_view(c, PAGE_STMT, REL_PAGE_SQL_FMT, 4, cfg);
}

static void on_page(int status, const PGresult *res, void *data)
{
    page_req_t *r = data;
    size_t n = 0;
    const char *err = NULL;
    if (status == 0) {
        int rows = PQntuples(res);
        if (PQnfields(res) != 1 || PQftype(res, 0) != 20 /* int8 */ || rows > r->limit) {
            fo_log(FO_LOG_ERROR, "contract view returned an unexpected shape",
                   "fields=%d rows=%d; the follower column must be bigint", PQnfields(res), rows);
            status = FO_ECONTRACT;
            err = "the contract view's follower column is not bigint";
        } else {
            for (int i = 0; i < rows; i++) {
                int64_t id = rel__int8_from_binary(PQgetvalue(res, i, 0));
                if (n > 0 && id <= r->out[n - 1]) {
                    /* a join in the view that repeats a follower would make the page
                     * unwritable forever: fail the attempt with a message for the owner */
                    status = FO_EQUERY;
                    snprintf(r->why, sizeof r->why,
                             "the contract view returned follower %lld twice or out of order;"
                             " it must return each follower once (fix the view)",
                             (long long)id);
                    err = r->why;
                    n = 0;
                    break;
                }
                r->out[n++] = id;
            }
        }
    } else if (res) {
        /* Errors of the moment (a standby's recovery conflict, lack of resources, a server
         * shutting down or a lost connection) wait like a lost connection; a view that
         * changed under the query pauses the work (the daemon checks the contract); anything
         * else (a statement or lock timeout, an error in the view's data) fails the
         * attempt. */
        rel_err_kind_t kind = rel_err_classify_result(res);
        status = kind == REL_ERR_TRANSIENT  ? FO_EPG
                 : kind == REL_ERR_CONTRACT ? FO_ECONTRACT
                                            : FO_EQUERY;
        err = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        if (!err)
            err = "unknown error";
        char what[512];
        fo_log_quote(what, sizeof what, err);
        fo_log(FO_LOG_WARN, "follower page query failed", "error=%s", what);
    }
    r->cb(status, r->out, status == 0 ? n : 0, err, r->data);
    free(r);
}

int rel_followers_fetch(rel_conn_t *c, int64_t author, int64_t after, int64_t upto, int limit,
                        int64_t *out, rel_page_cb cb, void *data)
{
    char a[24], lo[24], hi[24], lim[16];
    snprintf(a, sizeof a, "%" PRId64, author);
    snprintf(lo, sizeof lo, "%" PRId64, after);
    snprintf(hi, sizeof hi, "%" PRId64, upto);
    snprintf(lim, sizeof lim, "%d", limit);
    const char *params[] = {a, lo, hi, lim};
    page_req_t *r = fo_xmalloc(sizeof *r);
    *r = (page_req_t){.out = out, .limit = limit, .cb = cb, .data = data};
    int rc = rel_conn_exec(c, PAGE_STMT, 4, params, 1, on_page, r);
    if (rc < 0)
        free(r);
    return rc;
}
