/*
 * ntf_uv.c: the notifier's own hiredis <-> libuv adapter, over redisAsyncContext's ev hooks.
 *
 * One ntf_uv_t per hiredis context: a uv_poll_t on the context's socket, the events hiredis
 * wants (`want`) and the events libuv is currently polling for (`armed`). It replaces
 * hiredis 0.14.1's bundled adapter (adapters/libuv.h), which gets two things wrong:
 *   - a poll error (status < 0, e.g. a refused connect) was dropped, so hiredis never learnt
 *     of it and the connect callback never ran. Here the error is handed to hiredis through
 *     redisAsyncHandleWrite/Read for the events it was waiting for; the failing read, write
 *     or SO_ERROR check makes hiredis report it through its usual callbacks.
 *   - every hook call restarted the poll, one epoll_ctl per command. Here libuv is told only
 *     when the wanted mask differs from the armed one.
 * Invariants: `ac` is NULL once hiredis called cleanup (the context is being freed and must
 * not be touched); the struct is freed only in the poll handle's close callback.
 */
#include "notifier/ntf_int.h"

#include <stdlib.h>

#include "common/common.h"

typedef struct ntf_uv {
    redisAsyncContext *ac; /* NULL after cleanup */
    uv_poll_t poll;
    int want;  /* UV_READABLE | UV_WRITABLE as hiredis last asked */
    int armed; /* what the poll handle is started with; 0 when stopped */
} ntf_uv_t;

static void ev_on_poll(uv_poll_t *h, int status, int events);

/* Tells libuv about a change of the wanted mask, and only then. */
static void ev_sync(ntf_uv_t *p)
{
    if (p->want == p->armed || uv_is_closing((uv_handle_t *)&p->poll))
        return;
    if (p->want)
        uv_poll_start(&p->poll, p->want, ev_on_poll);
    else
        uv_poll_stop(&p->poll);
    p->armed = p->want;
}

static void ev_on_poll(uv_poll_t *h, int status, int events)
{
    ntf_uv_t *p = h->data;
    if (status < 0) {
        /* libuv has stopped the handle; let hiredis find the error where it was looking. */
        p->armed = 0;
        events = p->want ? p->want : UV_READABLE;
    }
    /* Either call may free the context (cleanup then clears p->ac); p itself stays valid
     * until the close callback, which cannot run before we return. */
    if (p->ac && (events & UV_READABLE))
        redisAsyncHandleRead(p->ac);
    if (p->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(p->ac);
    if (p->ac)
        ev_sync(p);
}

static void ev_add_read(void *privdata)
{
    ntf_uv_t *p = privdata;
    p->want |= UV_READABLE;
    ev_sync(p);
}

static void ev_del_read(void *privdata)
{
    ntf_uv_t *p = privdata;
    p->want &= ~UV_READABLE;
    ev_sync(p);
}

static void ev_add_write(void *privdata)
{
    ntf_uv_t *p = privdata;
    p->want |= UV_WRITABLE;
    ev_sync(p);
}

static void ev_del_write(void *privdata)
{
    ntf_uv_t *p = privdata;
    p->want &= ~UV_WRITABLE;
    ev_sync(p);
}

static void ev_on_close(uv_handle_t *h)
{
    free(h->data);
}

/* hiredis is freeing the context. Closing the poll now, while the socket is still open,
 * also removes it from epoll, so a new socket with the same fd number can be polled. */
static void ev_cleanup(void *privdata)
{
    ntf_uv_t *p = privdata;
    p->ac = NULL;
    if (!uv_is_closing((uv_handle_t *)&p->poll))
        uv_close((uv_handle_t *)&p->poll, ev_on_close);
}

int ntf__uv_attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    if (ac->ev.data)
        return UV_EEXIST;
    ntf_uv_t *p = fo_xcalloc(1, sizeof *p);
    int rc = uv_poll_init_socket(loop, &p->poll, ac->c.fd);
    if (rc < 0) {
        free(p);
        return rc;
    }
    p->poll.data = p;
    p->ac = ac;
    ac->ev.data = p;
    ac->ev.addRead = ev_add_read;
    ac->ev.delRead = ev_del_read;
    ac->ev.addWrite = ev_add_write;
    ac->ev.delWrite = ev_del_write;
    ac->ev.cleanup = ev_cleanup;
    return 0;
}
