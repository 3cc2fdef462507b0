/*
 * backoff.c: the retry delay with jitter, one policy for PostgreSQL and Redis reconnects and
 * for job retries.
 *
 * Full jitter (a uniformly random delay up to a ceiling that doubles per failure) keeps
 * workers that lost the same server at the same moment from coming back in step. That needs
 * a generator seeded differently in every process: rand() unseeded gives every fanoutd the
 * same sequence. The state is a xorshift64 seeded from the pid, the monotonic clock and an
 * address, and seeded again when the pid changes (a forked child). One loop thread: no lock.
 */
#include "common/common.h"

#include <time.h>
#include <unistd.h>

#define BACKOFF_FLOOR_MS 50
#define BACKOFF_START_MS 100
#define BACKOFF_MAX_SHIFT 20

static uint64_t rng_state;
static pid_t rng_pid;

static uint64_t next_random(void)
{
    pid_t pid = getpid();
    if (!rng_state || pid != rng_pid) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^ ((uint64_t)pid << 40) ^
                        (uint64_t)(uintptr_t)&rng_state ^ 0x9e3779b97f4a7c15ull;
        rng_state = seed ? seed : 1;
        rng_pid = pid;
    }
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

uint64_t fo_random_upto(uint64_t n)
{
    uint64_t r = next_random();
    return n == UINT64_MAX ? r : r % (n + 1);
}

uint64_t fo_doubling_ms(unsigned failures, uint64_t first_ms, uint64_t cap_ms)
{
    unsigned shift = failures < BACKOFF_MAX_SHIFT ? failures : BACKOFF_MAX_SHIFT;
    uint64_t ms = first_ms << shift;
    return ms < cap_ms ? ms : cap_ms;
}

uint64_t fo_backoff_ms(unsigned failures, uint64_t cap_ms)
{
    return BACKOFF_FLOOR_MS + fo_random_upto(fo_doubling_ms(failures, BACKOFF_START_MS, cap_ms));
}
