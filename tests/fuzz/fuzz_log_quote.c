/*
 * fuzz_log_quote.c: fo_log_quote, which every log line's untrusted values (PostgreSQL and
 * Redis error texts, host names) go through, on arbitrary strings and buffer sizes.
 *
 * Invariants: nothing is written outside buf[0..size); the result is NUL-terminated within
 * it; a bare value holds no space, quote, '=', backslash or control character and is a
 * prefix of the input; a quoted value starts and ends with '"', holds no control character,
 * and every '"' or '\' inside is escaped, so a value can never end a logfmt pair early or
 * break the line. When the quoted value was not truncated, unescaping gives back the input
 * (controls other than newline shown as spaces).
 */
#include "common/common.h"

#include "fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_in_t in = {data, size};
    /* 1 .. 1024: every caller passes a char array; size 0 is outside the contract. */
    size_t bufsize = 1 + fuzz_u8(&in) * 4u + fuzz_u8(&in) % 4u;
    char *s = fuzz_str(&in);
    /* Exactly bufsize bytes, so ASan sees any write past them. */
    char *buf = malloc(bufsize);
    const char *out = fo_log_quote(buf, bufsize, s);
    FUZZ_CHECK(out == buf, "returned another pointer");
    size_t len = strnlen(buf, bufsize);
    FUZZ_CHECK(len < bufsize, "not NUL-terminated within %zu bytes", bufsize);
    if (len == 0 || buf[0] != '"') {
        FUZZ_CHECK(strncmp(buf, s, len) == 0, "bare value \"%s\" is not a prefix of the input",
                   buf);
        FUZZ_CHECK(strcspn(buf, " \"=\\\n\r\t") == len, "bare value \"%s\" needs quotes", buf);
        for (size_t i = 0; i < len; i++)
            FUZZ_CHECK((unsigned char)buf[i] >= 0x20, "control character in a bare value");
        goto done;
    }
    FUZZ_CHECK(len >= 2 && buf[len - 1] == '"', "quoted value \"%s\" is not closed", buf);
    /* Unescape the inside and compare with the input. */
    size_t k = 0;
    for (size_t i = 1; i < len - 1; i++, k++) {
        unsigned char c = (unsigned char)buf[i];
        FUZZ_CHECK(c >= 0x20, "control character 0x%02x inside quotes", c);
        FUZZ_CHECK(c != '"', "unescaped quote at %zu in %s", i, buf);
        char want = s[k];
        if ((unsigned char)want < 0x20 && want != '\n')
            want = ' ';
        if (c == '\\') {
            FUZZ_CHECK(i + 1 < len - 1, "dangling backslash in %s", buf);
            char e = buf[++i];
            FUZZ_CHECK(e == '"' || e == '\\' || e == 'n', "unknown escape \\%c", e);
            c = (unsigned char)(e == 'n' ? '\n' : e);
        }
        FUZZ_CHECK(want != '\0' && (char)c == want, "quoted value differs from the input at %zu",
                   k);
    }
    /* Not truncated (room to spare): the whole input came through. */
    if (len + 4 < bufsize)
        FUZZ_CHECK(s[k] == '\0', "input cut short with %zu bytes free", bufsize - len);
done:
    free(buf);
    free(s);
    return 0;
}
