/* The udp backend's kernel fast path: flannel's udp wire format (one inner IPv4 packet per
 * UDP datagram, sport = dport = the backend Port) in two tc (clsact, direct-action) programs.
 *
 * Built at development time only, by deploy/build-bpf.py (clang-14 -O2 -target bpf
 * -mcpu=v2); the instruction words are embedded in backends/udp/bpfcode.py and loaded by
 * backends/udp/kernel.py with no compiler at runtime. The loader turns every `ld_imm64` that
 * references one of the placeholder maps below into a map-fd load (BPF_PSEUDO_MAP_FD).
 *
 * Anything these programs are not sure about returns TC_ACT_OK: the packet then takes the
 * userspace path (flannel0's TUN on egress, the agent's UDP socket on ingress), which applies
 * the same rules and counts what it drops, exactly as without the fast path.
 * All addresses in the maps are in network byte order; ports are in host order. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* kernel >= 6.3, not in older uapi headers */
#endif

#define OUTER_LEN 28 /* 20 IPv4 + 8 UDP */

/* kplan.py encodes these; keep the two in step */
struct cfg {
	__u32 local_ip;    /* the address the agent's UDP socket is bound to */
	__u32 subnet, mask; /* this node's subnet */
	__u32 eth_ifindex, tun_ifindex;
	__u32 port;        /* the backend Port; 0 = not configured yet: everything falls through */
};
struct lpm_key { __u32 prefixlen; __u32 addr; };
struct route_val { __u32 peer_ip; __u32 port; __u32 flags; };
#define ROUTE_KERNEL 1 /* the peer runs this fast path: see kplan.py */

/* placeholders: the loader patches the ld_imm64 that references them with map fds */
struct mapref { int unused; };
struct mapref cfg_map SEC("maps");   /* ARRAY[1] of struct cfg */
struct mapref route_map SEC("maps"); /* LPM_TRIE lpm_key -> route_val: peer subnet -> peer */
struct mapref stats_map SEC("maps"); /* ARRAY[8] of u64 counters, names in kplan.STATS */

enum { ST_ENCAPSULATED, ST_EGRESS_MISSES, ST_EGRESS_FALLBACKS, ST_EGRESS_ERRORS,
       ST_DECAPSULATED, ST_INGRESS_FALLBACKS, ST_INGRESS_ERRORS, ST_EGRESS_USERSPACE_PEERS };

static __always_inline void stat(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&stats_map, &idx);
	if (c)
		__sync_fetch_and_add(c, 1);
}

/* the header checksum after decrementing the TTL (as the kernel's ip_decrease_ttl) */
static __always_inline __u16 ttl_check(__u16 check_be)
{
	__u32 c = (__u32)bpf_ntohs(check_be) + 0x0100;
	c = (c + (c >= 0xffff)) & 0xffff;
	return bpf_htons((__u16)c);
}

/* the ones' complement sum of a 20-byte IPv4 header, folded: 0xffff when its checksum is right */
static __always_inline __u32 fold10(const __u16 *w)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return sum;
}

struct ttl_proto_check { __u8 ttl, protocol; __u16 check; };
struct outer { struct iphdr ip; struct udphdr udp; };

SEC("tc_egress")
int flannel_egress(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	if (data + sizeof(struct iphdr) > end) {
		if (bpf_skb_pull_data(skb, sizeof(struct iphdr)))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + sizeof(struct iphdr) > end)
			return TC_ACT_OK;
	}
	struct iphdr *ip = data;
	if (ip->version != 4)
		return TC_ACT_OK;
	__u32 k0 = 0;
	struct cfg *c = bpf_map_lookup_elem(&cfg_map, &k0);
	if (!c || !c->port)
		return TC_ACT_OK;
	struct lpm_key key = { .prefixlen = 32, .addr = ip->daddr };
	struct route_val *r = bpf_map_lookup_elem(&route_map, &key);
	if (!r) {
		stat(ST_EGRESS_MISSES);
		return TC_ACT_OK; /* the TUN: userspace answers with ICMP unreachable */
	}
	if (!(r->flags & ROUTE_KERNEL)) {
		/* a userspace (or reference) peer: our kernel may leave the inner checksum
		 * unfinished, which only a NIC would finish; userspace finishes it */
		stat(ST_EGRESS_USERSPACE_PEERS);
		return TC_ACT_OK;
	}
	if (ip->ttl <= 1) {
		stat(ST_EGRESS_FALLBACKS);
		return TC_ACT_OK; /* userspace drops and counts it */
	}
	struct ttl_proto_check tpc = { ip->ttl - 1, ip->protocol, ttl_check(ip->check) };
	__u32 peer = r->peer_ip, peer_port = r->port, local = c->local_ip, eth = c->eth_ifindex;
	__u32 sport = c->port;
	__u32 inner_len = skb->len;
	/* flannel0 is an L3 device (mac_len 0): the room opens at the very front; it fails with
	 * the skb untouched (non-TCP GSO, say), and then the TUN takes the packet.
	 * bpf_redirect_neigh() wants an Ethernet header in front: bpf_skb_change_head() grows a
	 * dummy one (and resets mac_header), which redirect_neigh replaces. */
	if (bpf_skb_adjust_room(skb, OUTER_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
				BPF_F_ADJ_ROOM_ENCAP_L4_UDP)) {
		stat(ST_EGRESS_FALLBACKS);
		return TC_ACT_OK;
	}
	if (bpf_skb_change_head(skb, ETH_HLEN, 0)) {
		stat(ST_EGRESS_ERRORS);
		return TC_ACT_SHOT; /* the outer room is there already: no way back */
	}
	struct outer h = {};
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons((__u16)(inner_len + OUTER_LEN));
	h.ip.frag_off = bpf_htons(0x4000); /* DF, as the agent's PMTU-discovering socket */
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = local;
	h.ip.daddr = peer;
	h.ip.check = (__u16)~fold10((const __u16 *)&h.ip);
	h.udp.source = bpf_htons((__u16)sport);
	h.udp.dest = bpf_htons((__u16)peer_port);
	h.udp.len = bpf_htons((__u16)(inner_len + 8));
	h.udp.check = 0;
	struct ethhdr eh = {}; /* unicast zero MACs */
	eh.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_store_bytes(skb, 0, &eh, sizeof(eh), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + OUTER_LEN + 8, &tpc, sizeof(tpc), 0)) {
		stat(ST_EGRESS_ERRORS);
		return TC_ACT_SHOT;
	}
	stat(ST_ENCAPSULATED);
	return bpf_redirect_neigh(eth, NULL, 0, 0);
}

#define IN_HDRS (14 + 20 + 8 + 20)

SEC("tc_ingress")
int flannel_ingress(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	if (data + IN_HDRS > end) {
		if (skb->len < IN_HDRS || bpf_skb_pull_data(skb, IN_HDRS))
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + IN_HDRS > end)
			return TC_ACT_OK;
	}
	struct ethhdr *eh = data;
	if (eh->h_proto != bpf_htons(ETH_P_IP)) /* VLAN-tagged: the stack's business */
		return TC_ACT_OK;
	struct iphdr *oip = data + 14;
	if (oip->version != 4 || oip->ihl != 5 || oip->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	if (oip->frag_off & bpf_htons(0x3fff)) /* fragments: the stack reassembles them */
		return TC_ACT_OK;
	struct udphdr *udp = data + 34;
	__u32 k0 = 0;
	struct cfg *c = bpf_map_lookup_elem(&cfg_map, &k0);
	if (!c || !c->port)
		return TC_ACT_OK;
	if (udp->dest != bpf_htons((__u16)c->port) || oip->daddr != c->local_ip)
		return TC_ACT_OK; /* not for the agent's socket */
	/* a datagram for the agent: from here on, whatever fails a rule goes to the socket,
	 * where userspace drops it and counts why */
	struct iphdr *iip = data + 42;
	__u32 udp_len = bpf_ntohs(udp->len);
	struct route_val *r;
	struct lpm_key key = { .prefixlen = 32, .addr = iip->saddr };
	/* a GSO super-packet (our egress's, kept whole across a veth) is judged by its headers,
	 * which every segment will carry; its length fields hold the whole length, as checked */
	if (udp->source != bpf_htons((__u16)c->port) ||
	    bpf_ntohs(oip->tot_len) != udp_len + 20 || skb->len != 14 + 20 + udp_len ||
	    bpf_ntohs(iip->tot_len) + 8 != udp_len || iip->version != 4 || iip->ihl != 5 ||
	    fold10((const __u16 *)iip) != 0xffff || iip->ttl <= 1 ||
	    (iip->daddr & c->mask) != c->subnet)
		goto fallback;
	r = bpf_map_lookup_elem(&route_map, &key);
	if (!r || r->peer_ip != oip->saddr) /* a stranger, or a source not the sender's */
		goto fallback;
	struct ttl_proto_check tpc = { iip->ttl - 1, iip->protocol, ttl_check(iip->check) };
	__u32 tun = c->tun_ifindex;
	if (bpf_skb_adjust_room(skb, -OUTER_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4))
		goto fallback;
	if (bpf_skb_store_bytes(skb, 14 + 8, &tpc, sizeof(tpc), 0)) {
		stat(ST_INGRESS_ERRORS);
		return TC_ACT_SHOT;
	}
	stat(ST_DECAPSULATED);
	return bpf_redirect(tun, BPF_F_INGRESS);
fallback:
	stat(ST_INGRESS_FALLBACKS);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
