/*
 * peer_gate: a Proxy-Wasm (ABI 0.2.1) HTTP plugin in plain C against the raw ABI.
 *
 * Requests whose path starts with `protectedPrefix` are refused with 403 unless
 * the peer's SPIFFE ID (property connection.uri_san_peer_certificate) is listed in
 * `allowedPeers`. Every response gets the header `header: value`. It counts what it
 * saw with the metrics ABI: counters `peer_gate_requests` and `peer_gate_denied`, a
 * gauge `peer_gate_allowed_peers` and a histogram `peer_gate_path_bytes`.
 *
 * Configuration (the WasmPlugin's pluginConfig, as JSON):
 *   {"protectedPrefix": "/admin",
 *    "allowedPeers": ["spiffe://cluster.local/ns/ops/sa/admin"],
 *    "header": "x-weft-plugin", "value": "c-peer-gate"}
 * String values must not contain escaped quotes.
 *
 * Build: clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor \
 *          -o peer_gate.wasm peer_gate.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))

enum { OK = 0, NOT_FOUND = 1 };
enum { REQUEST_HEADERS = 0, RESPONSE_HEADERS = 2 };
enum { PLUGIN_CONFIGURATION = 7 };
enum { CONTINUE = 0 };
enum { LOG_INFO = 2, LOG_WARN = 3 };
enum { METRIC_COUNTER = 0, METRIC_GAUGE = 1, METRIC_HISTOGRAM = 2 };

IMPORT(proxy_log) int32_t proxy_log(int32_t level, const char *msg, size_t len);
IMPORT(proxy_get_buffer_bytes)
int32_t proxy_get_buffer_bytes(int32_t type, int32_t start, int32_t max, char **ptr, size_t *len);
IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(int32_t map, const char *key, size_t key_len, char **ptr, size_t *len);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(int32_t map, const char *key, size_t key_len, const char *val, size_t val_len);
IMPORT(proxy_get_property)
int32_t proxy_get_property(const char *path, size_t path_len, char **ptr, size_t *len);
IMPORT(proxy_define_metric)
int32_t proxy_define_metric(int32_t type, const char *name, size_t name_len, uint32_t *id);
IMPORT(proxy_increment_metric) int32_t proxy_increment_metric(uint32_t id, int64_t offset);
IMPORT(proxy_record_metric) int32_t proxy_record_metric(uint32_t id, uint64_t value);
IMPORT(proxy_send_local_response)
int32_t proxy_send_local_response(int32_t status, const char *details, size_t details_len,
                                  const char *body, size_t body_len, const char *headers,
                                  size_t headers_len, int32_t grpc_status);

#define MAX_PEERS 32
#define MAX_STR 256

static char protected_prefix[MAX_STR] = "/admin";
static char header_name[MAX_STR] = "x-weft-plugin";
static char header_value[MAX_STR] = "c-peer-gate";
static char peers[MAX_PEERS][MAX_STR];
static int npeers = 0;

static uint32_t m_requests, m_denied, m_peers, m_path_bytes;

static void log_str(int32_t level, const char *s) { proxy_log(level, s, strlen(s)); }

static uint32_t metric(int32_t type, const char *name) {
  uint32_t id = 0;
  if (proxy_define_metric(type, name, strlen(name), &id) != OK) log_str(LOG_WARN, "peer_gate: a metric could not be defined");
  return id;
}

/* Host-allocated buffers come from this allocator. */
EXPORT(proxy_on_memory_allocate) void *on_memory_allocate(size_t size) { return malloc(size); }

EXPORT(proxy_abi_version_0_2_1) void abi_version(void) {}

/* Finds `"key"` in json and returns a pointer just after the following ':'. */
static const char *after_key(const char *json, const char *key) {
  size_t k = strlen(key);
  for (const char *p = json; (p = strchr(p, '"')) != NULL; p++) {
    if (strncmp(p + 1, key, k) == 0 && p[k + 1] == '"') {
      const char *q = p + k + 2;
      while (*q == ' ' || *q == '\t' || *q == '\n' || *q == '\r') q++;
      if (*q == ':') return q + 1;
    }
  }
  return NULL;
}

/* Copies the string starting at the first '"' of p into out; returns the end. */
static const char *read_string(const char *p, char *out, size_t cap) {
  const char *s = strchr(p, '"');
  if (!s) return NULL;
  const char *e = strchr(s + 1, '"');
  if (!e || (size_t)(e - s - 1) >= cap) return NULL;
  memcpy(out, s + 1, e - s - 1);
  out[e - s - 1] = 0;
  return e + 1;
}

static int configure(const char *json) {
  const char *p;
  if ((p = after_key(json, "protectedPrefix")) && !read_string(p, protected_prefix, MAX_STR)) return 0;
  if ((p = after_key(json, "header")) && !read_string(p, header_name, MAX_STR)) return 0;
  if ((p = after_key(json, "value")) && !read_string(p, header_value, MAX_STR)) return 0;
  npeers = 0;
  if ((p = after_key(json, "allowedPeers"))) {
    const char *end = strchr(p, ']');
    if (!end) return 0;
    while (npeers < MAX_PEERS) {
      const char *q = strchr(p, '"');
      if (!q || q > end) break;
      p = read_string(p, peers[npeers], MAX_STR);
      if (!p) return 0;
      npeers++;
    }
  }
  return 1;
}

EXPORT(proxy_on_context_create) void on_context_create(int32_t ctx, int32_t parent) {}

EXPORT(proxy_on_vm_start) int32_t on_vm_start(int32_t ctx, int32_t size) {
  m_requests = metric(METRIC_COUNTER, "peer_gate_requests");
  m_denied = metric(METRIC_COUNTER, "peer_gate_denied");
  m_peers = metric(METRIC_GAUGE, "peer_gate_allowed_peers");
  m_path_bytes = metric(METRIC_HISTOGRAM, "peer_gate_path_bytes");
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
  int ok = configure(json);
  free(json);
  if (!ok) log_str(LOG_WARN, "peer_gate: invalid configuration");
  else proxy_record_metric(m_peers, (uint64_t)npeers);
  return ok;
}

static int peer_allowed(void) {
  static const char path[] = "connection\0uri_san_peer_certificate";
  char *id = NULL;
  size_t len = 0;
  if (proxy_get_property(path, sizeof(path) - 1, &id, &len) != OK) return 0;
  int allowed = 0;
  for (int i = 0; i < npeers && !allowed; i++)
    allowed = strlen(peers[i]) == len && memcmp(peers[i], id, len) == 0;
  free(id);
  return allowed;
}

EXPORT(proxy_on_request_headers)
int32_t on_request_headers(int32_t ctx, int32_t headers, int32_t end_of_stream) {
  char *p = NULL;
  size_t len = 0;
  proxy_increment_metric(m_requests, 1);
  if (proxy_get_header_map_value(REQUEST_HEADERS, ":path", 5, &p, &len) != OK) return CONTINUE;
  proxy_record_metric(m_path_bytes, (uint64_t)len);
  size_t plen = strlen(protected_prefix);
  int protected = len >= plen && memcmp(p, protected_prefix, plen) == 0;
  free(p);
  if (protected && !peer_allowed()) {
    proxy_increment_metric(m_denied, 1);
    static const char body[] = "denied by the peer_gate plugin\n";
    static const char details[] = "peer_gate";
    proxy_send_local_response(403, details, sizeof(details) - 1, body, sizeof(body) - 1, NULL, 0, -1);
  }
  return CONTINUE;
}

EXPORT(proxy_on_response_headers)
int32_t on_response_headers(int32_t ctx, int32_t headers, int32_t end_of_stream) {
  proxy_add_header_map_value(RESPONSE_HEADERS, header_name, strlen(header_name), header_value,
                             strlen(header_value));
  return CONTINUE;
}

EXPORT(proxy_on_done) int32_t on_done(int32_t ctx) { return 1; }
EXPORT(proxy_on_log) void on_log(int32_t ctx) {}
EXPORT(proxy_on_delete) void on_delete(int32_t ctx) {}
