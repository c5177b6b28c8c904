/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Map keys and values shared by weft's eBPF programs and the node agent.
 * The Rust side mirrors every struct here with #[repr(C)] types and layout tests
 * (node-dataplane/src/ebpf/maps.rs): change both together.
 */
#ifndef WEFT_MAPS_H
#define WEFT_MAPS_H

#include <linux/types.h>

/* Ports of the node proxy's listeners inside each enrolled pod's netns. */
#define WEFT_OUTBOUND_PORT 15001
#define WEFT_INBOUND_PLAIN_PORT 15006
#define WEFT_HBONE_PORT 15008

/* Value of the weft_enrolled map (key: netns cookie, __u64). */
struct weft_pod {
	__u32 flags;    /* WEFT_POD_* */
	__u32 pod_ip4;  /* network order, for inbound capture; 0 if unknown */
};
#define WEFT_POD_ENROLLED 1

/* An original destination. Addresses and port in network byte order. */
struct weft_orig_dst {
	__u16 family;   /* AF_INET or AF_INET6 */
	__u16 port;     /* network order */
	__u32 ip4;
	__u32 ip6[4];
};

/*
 * A connection as the proxy's accepted socket sees it, in the pod's netns:
 * local = the listener (127.0.0.1:15001), remote = the application's socket.
 * Ports in host byte order.
 */
struct weft_tuple {
	__u64 netns_cookie;
	__u32 local_ip4;
	__u32 remote_ip4;
	__u32 local_ip6[4];
	__u32 remote_ip6[4];
	__u16 local_port;
	__u16 remote_port;
	__u32 family;
};

/* Settings written by the agent (array map, key 0). */
struct weft_settings {
	__u32 proxy_mark;   /* SO_MARK of the proxy's own sockets: never redirected */
	__u32 outbound_port;
};

/* Per-pod counters (per-CPU hash, key: netns cookie). */
struct weft_pod_stats {
	__u64 redirected;        /* connect() rewritten to the proxy */
	__u64 skipped_mark;      /* proxy's own sockets seen */
	__u64 established_out;   /* redirected connections established */
	__u64 established_in;    /* passive connections established */
	__u64 orig_dst_answers;  /* SO_ORIGINAL_DST answered */
};

/* Per-pod inbound counters (per-CPU hash, key: pod IPv4, network order). */
struct weft_inbound_stats {
	__u64 captured;   /* plaintext connections steered to the inbound listener */
	__u64 dropped;    /* enrolled but no listener (agent down): fail closed */
};

/* Inbound capture (sk_lookup, attached per pod netns). Keys: pod IPv4, network order. */
struct weft_inbound_pod {
	__u32 flags;  /* WEFT_POD_ENROLLED */
};

#endif
