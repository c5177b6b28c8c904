/*
 * rate_limit: a node-wide token bucket, as a Proxy-Wasm (ABI 0.2.1) HTTP plugin in
 * plain C against the raw ABI.
 *
 * The proxy runs one instance of a plugin per worker thread; the bucket lives in
 * the plugin's shared data (proxy_get/set_shared_data, updated with
 * compare-and-swap), so every instance on the node draws from the same bucket. A
 * request that finds it empty gets 429 with `retry-after: 1`.
 *
 * It also shows the rest of the root-context ABI:
 * - shared queue `rate_limit_denied`: each refused request enqueues its path; the
 *   instance that registered the queue last is told (proxy_on_queue_ready),
 *   dequeues it, logs it and counts it (counter `rate_limit_denials_logged`);
 * - a timer (proxy_set_tick_period_milliseconds, proxy_on_tick): every second
 *   each instance publishes the tokens left (gauge `rate_limit_tokens`).
 * Counters `rate_limit_allowed` and `rate_limit_denied` count decisions.
 *
 * Configuration (the WasmPlugin's pluginConfig, as JSON):
 *   {"requestsPerSecond": 10, "burst": 20}
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
 *          -o rate_limit.wasm rate_limit.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

enum { OK = 0, NOT_FOUND = 1, CAS_MISMATCH = 8 };
enum { REQUEST_HEADERS = 0 };
enum { PLUGIN_CONFIGURATION = 7 };
enum { CONTINUE = 0 };
enum { LOG_INFO = 2, LOG_WARN = 3 };
enum { METRIC_COUNTER = 0, METRIC_GAUGE = 1 };

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, int32_t start, int32_t max, char **ptr, size_t *len);
IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(int32_t map, const char *key, size_t key_len, char **ptr, size_t *len);
IMPORT(proxy_get_current_time_nanoseconds) int32_t proxy_get_current_time_nanoseconds(uint64_t *t);
IMPORT(proxy_get_shared_data)
int32_t proxy_get_shared_data(const char *key, size_t key_len, char **ptr, size_t *len, uint32_t *cas);
IMPORT(proxy_set_shared_data)
int32_t proxy_set_shared_data(const char *key, size_t key_len, const char *val, size_t val_len, uint32_t cas);
IMPORT(proxy_register_shared_queue)
int32_t proxy_register_shared_queue(const char *name, size_t name_len, uint32_t *id);
IMPORT(proxy_resolve_shared_queue)
int32_t proxy_resolve_shared_queue(const char *vm_id, size_t vm_id_len, const char *name, size_t name_len,
                                   uint32_t *id);
IMPORT(proxy_enqueue_shared_queue) int32_t proxy_enqueue_shared_queue(uint32_t id, const char *val, size_t len);
IMPORT(proxy_dequeue_shared_queue) int32_t proxy_dequeue_shared_queue(uint32_t id, char **ptr, size_t *len);
IMPORT(proxy_set_tick_period_milliseconds) int32_t proxy_set_tick_period_milliseconds(uint32_t ms);
IMPORT(proxy_define_metric)
int32_t proxy_define_metric(int32_t type, const char *name, size_t name_len, uint32_t *id);
IMPORT(proxy_increment_metric) int32_t proxy_increment_metric(uint32_t id, int64_t offset);
IMPORT(proxy_record_metric) int32_t proxy_record_metric(uint32_t id, uint64_t value);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(int32_t status, const char *details, size_t details_len,
                                  const char *body, size_t body_len, const char *headers,
                                  size_t headers_len, int32_t grpc_status);

static const char BUCKET[] = "rate_limit/bucket";
static const char QUEUE[] = "rate_limit_denied";

static int64_t per_second = 10;
static int64_t burst = 20;
static uint32_t m_allowed, m_denied, m_logged, m_tokens;

/* The bucket in shared data: thousandths of a token, and when it was last filled. */
struct bucket {
  int64_t milli_tokens;
  uint64_t filled_ns;
};

static void log_str(int32_t level, const char *s) { proxy_log(level, s, strlen(s)); }

static uint32_t metric(int32_t type, const char *name) {
  uint32_t id = 0;
  if (proxy_define_metric(type, name, strlen(name), &id) != OK) log_str(LOG_WARN, "rate_limit: a metric could not be defined");
  return id;
}

EXPORT(proxy_on_memory_allocate) void *on_memory_allocate(size_t size) { return malloc(size); }

EXPORT(proxy_abi_version_0_2_1) void abi_version(void) {}

/* The integer after `"key":` in json, or `fallback`. */
static int64_t int_of(const char *json, const char *key, int64_t fallback) {
  size_t k = strlen(key);
  for (const char *p = json; (p = strchr(p, '"')) != NULL; p++) {
    if (strncmp(p + 1, key, k) == 0 && p[k + 1] == '"') {
      const char *q = p + k + 2;
      while (*q == ' ' || *q == ':' || *q == '\t' || *q == '\n' || *q == '\r') q++;
      if (*q < '0' || *q > '9') return -1;
      int64_t v = 0;
      while (*q >= '0' && *q <= '9' && v < 1000000000) v = v * 10 + (*q++ - '0');
      return v;
    }
  }
  return fallback;
}

static uint64_t now_ns(void) {
  uint64_t t = 0;
  proxy_get_current_time_nanoseconds(&t);
  return t;
}

/* Reads the bucket (full when it does not exist yet) and its CAS token, refilled to now. */
static struct bucket read_bucket(uint32_t *cas, uint64_t now) {
  struct bucket b = {burst * 1000, now};
  char *v = NULL;
  size_t len = 0;
  *cas = 0;
  if (proxy_get_shared_data(BUCKET, sizeof(BUCKET) - 1, &v, &len, cas) == OK && len == sizeof b) memcpy(&b, v, sizeof b);
  free(v);
  if (now > b.filled_ns) {
    int64_t add = (int64_t)((now - b.filled_ns) / 1000000) * per_second; /* ms x tokens/s = milli-tokens */
    b.milli_tokens = b.milli_tokens + add > burst * 1000 ? burst * 1000 : b.milli_tokens + add;
    /* Only whole milliseconds were counted: keep the rest for next time. */
    b.filled_ns = now - (now - b.filled_ns) % 1000000;
  }
  return b;
}

/* Takes a token; 1 if there was one. Fails closed after repeated CAS conflicts. */
static int take_token(void) {
  for (int attempt = 0; attempt < 16; attempt++) {
    uint32_t cas;
    struct bucket b = read_bucket(&cas, now_ns());
    int allowed = b.milli_tokens >= 1000;
    if (allowed) b.milli_tokens -= 1000;
    int32_t s = proxy_set_shared_data(BUCKET, sizeof(BUCKET) - 1, (const char *)&b, sizeof b, cas);
    if (s == OK) return allowed;
    if (s != CAS_MISMATCH) return 0;
  }
  return 0;
}

EXPORT(proxy_on_context_create) void on_context_create(int32_t ctx, int32_t parent) {}

EXPORT(proxy_on_vm_start) int32_t on_vm_start(int32_t ctx, int32_t size) {
  m_allowed = metric(METRIC_COUNTER, "rate_limit_allowed");
  m_denied = metric(METRIC_COUNTER, "rate_limit_denied");
  m_logged = metric(METRIC_COUNTER, "rate_limit_denials_logged");
  m_tokens = metric(METRIC_GAUGE, "rate_limit_tokens");
  return 1;
}

EXPORT(proxy_on_configure) int32_t on_configure(int32_t ctx, int32_t size) {
  if (size > 0) {
    char *buf = NULL;
    size_t len = 0;
    if (proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &buf, &len) != OK) return 0;
    char *json = malloc(len + 1);
    memcpy(json, buf, len);
    json[len] = 0;
    free(buf);
    per_second = int_of(json, "requestsPerSecond", per_second);
    burst = int_of(json, "burst", burst);
    free(json);
    if (per_second < 0 || burst < 1) {
      log_str(LOG_WARN, "rate_limit: requestsPerSecond and burst must be non-negative integers, burst at least 1");
      return 0;
    }
  }
  uint32_t q;
  if (proxy_register_shared_queue(QUEUE, sizeof(QUEUE) - 1, &q) != OK) return 0;
  proxy_set_tick_period_milliseconds(1000);
  return 1;
}

EXPORT(proxy_on_request_headers)
int32_t on_request_headers(int32_t ctx, int32_t headers, int32_t end_of_stream) {
  if (take_token()) {
    proxy_increment_metric(m_allowed, 1);
    return CONTINUE;
  }
  proxy_increment_metric(m_denied, 1);
  char *path = NULL;
  size_t len = 0;
  uint32_t q;
  if (proxy_get_header_map_value(REQUEST_HEADERS, ":path", 5, &path, &len) == OK &&
      proxy_resolve_shared_queue("", 0, QUEUE, sizeof(QUEUE) - 1, &q) == OK)
    proxy_enqueue_shared_queue(q, path, len);
  free(path);
  static const char body[] = "rate limited\n";
  static const char details[] = "rate_limit";
  /* Serialized header map: 1 pair, retry-after: 1. */
  static const char hdrs[] = "\x01\0\0\0" "\x0b\0\0\0" "\x01\0\0\0" "retry-after\0" "1\0";
  proxy_send_local_response(429, details, sizeof(details) - 1, body, sizeof(body) - 1, hdrs, sizeof(hdrs) - 1, -1);
  return CONTINUE;
}

EXPORT(proxy_on_queue_ready) void on_queue_ready(int32_t ctx, uint32_t queue) {
  char *path = NULL;
  size_t len = 0;
  if (proxy_dequeue_shared_queue(queue, &path, &len) != OK) return;
  static const char prefix[] = "rate_limit: refused ";
  char msg[sizeof(prefix) + 256];
  size_t n = len < 256 ? len : 256;
  memcpy(msg, prefix, sizeof(prefix) - 1);
  memcpy(msg + sizeof(prefix) - 1, path, n);
  proxy_log(LOG_INFO, msg, sizeof(prefix) - 1 + n);
  proxy_increment_metric(m_logged, 1);
  free(path);
}

EXPORT(proxy_on_tick) void on_tick(int32_t ctx) {
  uint32_t cas;
  struct bucket b = read_bucket(&cas, now_ns());
  proxy_record_metric(m_tokens, (uint64_t)(b.milli_tokens / 1000));
}

EXPORT(proxy_on_done) int32_t on_done(int32_t ctx) { return 1; }
EXPORT(proxy_on_log) void on_log(int32_t ctx) {}
EXPORT(proxy_on_delete) void on_delete(int32_t ctx) {}
