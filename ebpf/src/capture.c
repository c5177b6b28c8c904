// SPDX-License-Identifier: Apache-2.0
/*
 * weft transparent capture for enrolled pods (attached once at the cgroup2 root;
 * every decision is per socket, from maps):
 *
 *   cgroup/connect4, connect6  an enrolled pod's connect(dst) goes to the node
 *                              proxy's in-pod outbound listener; dst is saved by
 *                              socket cookie.
 *   sockops                    on established: the saved dst moves to a map keyed by
 *                              the connection as the proxy's accepted socket sees it.
 *   cgroup/getsockopt          answers SO_ORIGINAL_DST on that accepted socket.
 *   cgroup/getpeername4, 6     the application sees the original peer, not the proxy.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weft_maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define IP6T_SO_ORIGINAL_DST 80
#define SOCK_STREAM 1
#define TCP_CLOSE 7

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct weft_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_enrolled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, __u64);
	__type(value, struct weft_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_orig_by_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weft_tuple);
	__type(value, struct weft_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_orig_by_tuple SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weft_settings);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_settings_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct weft_pod_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_pod_stats_map SEC(".maps");

static __always_inline struct weft_pod_stats *stats_of(__u64 netns)
{
	struct weft_pod_stats *s = bpf_map_lookup_elem(&weft_pod_stats_map, &netns);
	if (s)
		return s;
	struct weft_pod_stats zero = {};
	bpf_map_update_elem(&weft_pod_stats_map, &netns, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&weft_pod_stats_map, &netns);
}

/* Should this socket's connect() be captured? Returns the settings if so. */
static __always_inline struct weft_settings *capture_wanted(struct bpf_sock_addr *ctx, __u64 *netns)
{
	if (ctx->type != SOCK_STREAM)
		return 0;
	*netns = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&weft_enrolled, netns))
		return 0;
	__u32 zero = 0;
	struct weft_settings *cfg = bpf_map_lookup_elem(&weft_settings_map, &zero);
	if (!cfg || cfg->outbound_port == 0)
		return 0; /* agent has not configured us yet */
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	if (cfg->proxy_mark && sk->mark == cfg->proxy_mark) {
		struct weft_pod_stats *s = stats_of(*netns);
		if (s)
			s->skipped_mark++;
		return 0;
	}
	return cfg;
}

SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	__u64 netns;
	struct weft_settings *cfg = capture_wanted(ctx, &netns);
	if (!cfg)
		return 1;
	__u32 dst = ctx->user_ip4;
	/* Traffic to the pod's own loopback stays inside the pod. */
	if ((bpf_ntohl(dst) >> 24) == 127)
		return 1;
	struct weft_orig_dst orig = {
		.family = AF_INET,
		.port = (__u16)ctx->user_port,
		.ip4 = dst,
	};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&weft_orig_by_cookie, &cookie, &orig, BPF_ANY))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
	struct weft_pod_stats *s = stats_of(netns);
	if (s)
		s->redirected++;
	return 1;
}

SEC("cgroup/connect6")
int weft_connect6(struct bpf_sock_addr *ctx)
{
	__u64 netns;
	struct weft_settings *cfg = capture_wanted(ctx, &netns);
	if (!cfg)
		return 1;
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	/* ::1 and IPv4-mapped loopback stay inside the pod. */
	if (a0 == 0 && a1 == 0 && a2 == 0 && a3 == bpf_htonl(1))
		return 1;
	if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0xffff) && (bpf_ntohl(a3) >> 24) == 127)
		return 1;
	struct weft_orig_dst orig = {
		.family = AF_INET6,
		.port = (__u16)ctx->user_port,
		.ip6 = {a0, a1, a2, a3},
	};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (bpf_map_update_elem(&weft_orig_by_cookie, &cookie, &orig, BPF_ANY))
		return 1;
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = 0;
	ctx->user_ip6[3] = bpf_htonl(1);
	ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
	struct weft_pod_stats *s = stats_of(netns);
	if (s)
		s->redirected++;
	return 1;
}

/* The connection as the proxy's accepted socket will see it. */
static __always_inline void tuple_from_app_side(struct bpf_sock_ops *skops, __u64 netns, struct weft_tuple *t)
{
	t->netns_cookie = netns;
	t->family = skops->family;
	/* proxy local = app remote; proxy remote = app local */
	t->local_port = (__u16)bpf_ntohl(skops->remote_port);
	t->remote_port = (__u16)skops->local_port;
	if (skops->family == AF_INET) {
		t->local_ip4 = skops->remote_ip4;
		t->remote_ip4 = skops->local_ip4;
	} else {
		t->local_ip6[0] = skops->remote_ip6[0];
		t->local_ip6[1] = skops->remote_ip6[1];
		t->local_ip6[2] = skops->remote_ip6[2];
		t->local_ip6[3] = skops->remote_ip6[3];
		t->remote_ip6[0] = skops->local_ip6[0];
		t->remote_ip6[1] = skops->local_ip6[1];
		t->remote_ip6[2] = skops->local_ip6[2];
		t->remote_ip6[3] = skops->local_ip6[3];
	}
}

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	__u64 netns = bpf_get_netns_cookie(skops);
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		if (bpf_map_lookup_elem(&weft_enrolled, &netns)) {
			struct weft_pod_stats *s = stats_of(netns);
			if (s)
				s->established_in++;
		}
		return 1;
	}
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct weft_orig_dst *orig = bpf_map_lookup_elem(&weft_orig_by_cookie, &cookie);
	if (!orig)
		return 1;
	struct weft_tuple t = {};
	tuple_from_app_side(skops, netns, &t);
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		struct weft_orig_dst copy = *orig;
		bpf_map_update_elem(&weft_orig_by_tuple, &t, &copy, BPF_ANY);
		/* Ask for the close callback so both entries are removed with the socket. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		struct weft_pod_stats *s = stats_of(netns);
		if (s)
			s->established_out++;
	} else if (skops->args[1] == TCP_CLOSE) {
		bpf_map_delete_elem(&weft_orig_by_tuple, &t);
		bpf_map_delete_elem(&weft_orig_by_cookie, &cookie);
	}
	return 1;
}

SEC("cgroup/getsockopt")
int weft_getsockopt(struct bpf_sockopt *ctx)
{
	int v4 = ctx->level == SOL_IP && ctx->optname == SO_ORIGINAL_DST;
	int v6 = ctx->level == SOL_IPV6 && ctx->optname == IP6T_SO_ORIGINAL_DST;
	if (!v4 && !v6)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct weft_tuple t = {};
	t.netns_cookie = bpf_get_netns_cookie(ctx);
	t.family = sk->family;
	t.local_port = (__u16)sk->src_port;
	t.remote_port = (__u16)bpf_ntohs((__u16)sk->dst_port);
	if (sk->family == AF_INET) {
		t.local_ip4 = sk->src_ip4;
		t.remote_ip4 = sk->dst_ip4;
	} else {
		t.local_ip6[0] = sk->src_ip6[0];
		t.local_ip6[1] = sk->src_ip6[1];
		t.local_ip6[2] = sk->src_ip6[2];
		t.local_ip6[3] = sk->src_ip6[3];
		t.remote_ip6[0] = sk->dst_ip6[0];
		t.remote_ip6[1] = sk->dst_ip6[1];
		t.remote_ip6[2] = sk->dst_ip6[2];
		t.remote_ip6[3] = sk->dst_ip6[3];
	}
	struct weft_orig_dst *orig = bpf_map_lookup_elem(&weft_orig_by_tuple, &t);
	if (!orig)
		return 1;
	if (v4 && orig->family == AF_INET) {
		struct sockaddr_in *sa = ctx->optval;
		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		sa->sin_family = AF_INET;
		sa->sin_port = orig->port;
		sa->sin_addr.s_addr = orig->ip4;
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	} else if (v6 && orig->family == AF_INET6) {
		struct sockaddr_in6 *sa = ctx->optval;
		if ((void *)(sa + 1) > ctx->optval_end)
			return 1;
		sa->sin6_family = AF_INET6;
		sa->sin6_port = orig->port;
		sa->sin6_flowinfo = 0;
		sa->sin6_addr.in6_u.u6_addr32[0] = orig->ip6[0];
		sa->sin6_addr.in6_u.u6_addr32[1] = orig->ip6[1];
		sa->sin6_addr.in6_u.u6_addr32[2] = orig->ip6[2];
		sa->sin6_addr.in6_u.u6_addr32[3] = orig->ip6[3];
		sa->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	} else {
		return 1;
	}
	__u64 netns = t.netns_cookie;
	struct weft_pod_stats *s = stats_of(netns);
	if (s)
		s->orig_dst_answers++;
	return 1;
}

SEC("cgroup/getpeername4")
int weft_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct weft_orig_dst *orig = bpf_map_lookup_elem(&weft_orig_by_cookie, &cookie);
	if (!orig || orig->family != AF_INET)
		return 1;
	ctx->user_ip4 = orig->ip4;
	ctx->user_port = orig->port;
	return 1;
}

SEC("cgroup/getpeername6")
int weft_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct weft_orig_dst *orig = bpf_map_lookup_elem(&weft_orig_by_cookie, &cookie);
	if (!orig || orig->family != AF_INET6)
		return 1;
	ctx->user_ip6[0] = orig->ip6[0];
	ctx->user_ip6[1] = orig->ip6[1];
	ctx->user_ip6[2] = orig->ip6[2];
	ctx->user_ip6[3] = orig->ip6[3];
	ctx->user_port = orig->port;
	return 1;
}
