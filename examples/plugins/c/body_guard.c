/*
 * body_guard: a Proxy-Wasm (ABI 0.2.1) HTTP plugin in plain C against the raw ABI
 * that reads message bodies.
 *
 * - A request whose body contains `blocked` is refused with 403.
 * - Every occurrence of `redact` in a response body is replaced by as many '*'.
 *
 * The host delivers each body whole (docs/plugins.md, "Bodies"), so the plugin
 * reads it with proxy_get_buffer_bytes and writes it back with
 * proxy_set_buffer_bytes. It counts what it did: counters `body_guard_blocked` and
 * `body_guard_redacted`.
 *
 * Configuration (the WasmPlugin's pluginConfig, as JSON):
 *   {"blocked": "DROP TABLE", "redact": "secret"}
 * String values must not contain escaped quotes.
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
 *          -o body_guard.wasm body_guard.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

enum { OK = 0 };
enum { PLUGIN_CONFIGURATION = 7, REQUEST_BODY = 0, RESPONSE_BODY = 1 };
enum { CONTINUE = 0, PAUSE = 1 };
enum { METRIC_COUNTER = 0 };

IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, int32_t start, int32_t max, char **ptr, size_t *len);
IMPORT(proxy_set_buffer_bytes)
int32_t proxy_set_buffer_bytes(int32_t type, int32_t start, int32_t length, const char *data, size_t len);
IMPORT(proxy_define_metric)
int32_t proxy_define_metric(int32_t type, const char *name, size_t name_len, uint32_t *id);
IMPORT(proxy_increment_metric) int32_t proxy_increment_metric(uint32_t id, int64_t offset);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(int32_t status, const char *details, size_t details_len,
                                  const char *body, size_t body_len, const char *headers,
                                  size_t headers_len, int32_t grpc_status);

#define MAX_STR 256
static char blocked[MAX_STR] = "DROP TABLE";
static char redact[MAX_STR] = "secret";
static uint32_t m_blocked, m_redacted;

EXPORT(proxy_on_memory_allocate) void *on_memory_allocate(size_t size) { return malloc(size); }
EXPORT(proxy_abi_version_0_2_1) void abi_version(void) {}
EXPORT(proxy_on_context_create) void on_context_create(int32_t ctx, int32_t parent) {}

/* Copies the string value of `"key":` in json into out. */
static int string_of(const char *json, const char *key, char *out, size_t cap) {
  size_t k = strlen(key);
  for (const char *p = json; (p = strchr(p, '"')) != NULL; p++) {
    if (strncmp(p + 1, key, k) != 0 || p[k + 1] != '"') continue;
    const char *s = strchr(p + k + 2, '"');
    if (!s) return 0;
    const char *e = strchr(s + 1, '"');
    if (!e || (size_t)(e - s - 1) >= cap) return 0;
    memcpy(out, s + 1, e - s - 1);
    out[e - s - 1] = 0;
    return 1;
  }
  return 1; /* absent: the default stays */
}

EXPORT(proxy_on_vm_start) int32_t on_vm_start(int32_t ctx, int32_t size) {
  proxy_define_metric(METRIC_COUNTER, "body_guard_blocked", 18, &m_blocked);
  proxy_define_metric(METRIC_COUNTER, "body_guard_redacted", 19, &m_redacted);
  return 1;
}

EXPORT(proxy_on_configure) int32_t on_configure(int32_t ctx, int32_t size) {
  if (size == 0) return 1;
  char *buf = NULL;
  size_t len = 0;
  if (proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &buf, &len) != OK) return 0;
  char *json = malloc(len + 1);
  memcpy(json, buf, len);
  json[len] = 0;
  free(buf);
  int ok = string_of(json, "blocked", blocked, MAX_STR) && string_of(json, "redact", redact, MAX_STR);
  free(json);
  return ok && blocked[0] && redact[0];
}

/* The first occurrence of needle in hay[0..n), or NULL. */
static char *find(char *hay, size_t n, const char *needle) {
  size_t k = strlen(needle);
  for (size_t i = 0; k && i + k <= n; i++)
    if (memcmp(hay + i, needle, k) == 0) return hay + i;
  return NULL;
}

EXPORT(proxy_on_request_body)
int32_t on_request_body(int32_t ctx, int32_t size, int32_t end_of_stream) {
  if (!end_of_stream) return PAUSE; /* the whole body, please */
  char *body = NULL;
  size_t len = 0;
  if (size == 0 || proxy_get_buffer_bytes(REQUEST_BODY, 0, size, &body, &len) != OK) return CONTINUE;
  int bad = find(body, len, blocked) != NULL;
  free(body);
  if (bad) {
    proxy_increment_metric(m_blocked, 1);
    static const char msg[] = "blocked by body_guard\n";
    proxy_send_local_response(403, "body_guard", 10, msg, sizeof(msg) - 1, NULL, 0, -1);
  }
  return CONTINUE;
}

EXPORT(proxy_on_response_body)
int32_t on_response_body(int32_t ctx, int32_t size, int32_t end_of_stream) {
  if (!end_of_stream) return PAUSE;
  char *body = NULL;
  size_t len = 0;
  if (size == 0 || proxy_get_buffer_bytes(RESPONSE_BODY, 0, size, &body, &len) != OK) return CONTINUE;
  size_t k = strlen(redact);
  int changed = 0;
  for (char *p = find(body, len, redact); p; p = find(p + k, len - (size_t)(p + k - body), redact)) {
    memset(p, '*', k);
    changed = 1;
  }
  if (changed) {
    proxy_set_buffer_bytes(RESPONSE_BODY, 0, (int32_t)len, body, len);
    proxy_increment_metric(m_redacted, 1);
  }
  free(body);
  return CONTINUE;
}

EXPORT(proxy_on_done) int32_t on_done(int32_t ctx) { return 1; }
EXPORT(proxy_on_log) void on_log(int32_t ctx) {}
EXPORT(proxy_on_delete) void on_delete(int32_t ctx) {}
