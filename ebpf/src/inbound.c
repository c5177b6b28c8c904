// SPDX-License-Identifier: Apache-2.0
/*
 * weft inbound capture: sk_lookup, attached to each enrolled pod's network
 * namespace. A TCP connection arriving for the pod's IP from outside the mesh
 * (any port but the proxy's own) is handed to the node proxy's in-pod plaintext
 * listener (15006), which authorizes and forwards it. Left alone: HBONE (15008)
 * and the proxy's ports, loopback, and connections from the pod's own IP (the
 * proxy's hop to the application). If the pod is enrolled but its listener is
 * gone (agent down), the connection is dropped: fail closed.
 *
 * IPv6 is not captured yet (the proxy listens on IPv4), so an IPv6 connection
 * from outside the pod is dropped rather than let through unauthorized: the
 * program is attached only to enrolled pods' namespaces. Loopback, the pod's own
 * address and the proxy's ports are left alone as for IPv4.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_maps.h"

#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct weft_inbound_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_inbound_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u32);
} weft_inbound_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct weft_inbound_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_inbound_stats_map SEC(".maps");

static __always_inline struct weft_inbound_stats *istats(__u32 ip)
{
	struct weft_inbound_stats *s = bpf_map_lookup_elem(&weft_inbound_stats_map, &ip);
	if (s)
		return s;
	struct weft_inbound_stats zero = {};
	bpf_map_update_elem(&weft_inbound_stats_map, &ip, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&weft_inbound_stats_map, &ip);
}

static __always_inline int ipv6_inbound(struct bpf_sk_lookup *ctx)
{
	__u32 l0 = ctx->local_ip6[0], l1 = ctx->local_ip6[1];
	__u32 l2 = ctx->local_ip6[2], l3 = ctx->local_ip6[3];
	if (!l0 && !l1 && !l2 && l3 == bpf_htonl(1))
		return SK_PASS; /* ::1 */
	if (l0 == ctx->remote_ip6[0] && l1 == ctx->remote_ip6[1] &&
	    l2 == ctx->remote_ip6[2] && l3 == ctx->remote_ip6[3])
		return SK_PASS; /* from the pod itself */
	return SK_DROP;
}

SEC("sk_lookup")
int weft_inbound(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u32 port = ctx->local_port;
	if (port == WEFT_HBONE_PORT || port == WEFT_INBOUND_PLAIN_PORT || port == WEFT_OUTBOUND_PORT)
		return SK_PASS;
	if (ctx->family == AF_INET6)
		return ipv6_inbound(ctx);
	if (ctx->family != AF_INET)
		return SK_PASS;
	__u32 local = ctx->local_ip4;
	if ((bpf_ntohl(local) >> 24) == 127 || ctx->remote_ip4 == local)
		return SK_PASS;
	if (!bpf_map_lookup_elem(&weft_inbound_pods, &local))
		return SK_PASS;
	struct weft_inbound_stats *s = istats(local);
	struct bpf_sock *sk = bpf_map_lookup_elem(&weft_inbound_socks, &local);
	if (!sk) {
		if (s)
			s->dropped++;
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		if (s)
			s->dropped++;
		return SK_DROP;
	}
	if (s)
		s->captured++;
	return SK_PASS;
}
