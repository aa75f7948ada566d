//! Ethernet / ARP / IPv4 / ICMP / UDP handling of the net-echo workload.
//!
//! Pure code with no dependencies: compiled into the guest kernel (ring 3) and, through a
//! `#[path]` module in `src/lib.rs`, into the host unit tests of the `guest` crate.
//!
//! [`handle_frame`] looks at one received Ethernet II frame (without the virtio-net header)
//! and, if it deserves an answer, builds the answer frame:
//! - ARP request (Ethernet, IPv4) for our IP (broadcast or to our MAC) -> ARP reply;
//! - IPv4 to our MAC and IP, header checksum valid, not fragmented, from a unicast source:
//!   - ICMP echo request (valid ICMP checksum) -> echo reply with the same id, sequence and
//!     data;
//!   - UDP (valid checksum, or none) on any port -> the same payload back to the sender's
//!     address and port, from the port it was sent to;
//!
//!   replies carry a fresh 20-byte IPv4 header (no options, TTL 64, DF, `ip_id` from the caller)
//!   and go to the Ethernet source of the request (no ARP cache needed);
//! - everything else (IPv6, VLAN tags, ARP replies, other protocols, other addresses) is
//!   ignored.
//!
//! Frames shorter than 60 bytes are padded with zeros to 60.

pub const ETH_HLEN: usize = 14;
/// Smallest Ethernet frame without FCS.
pub const ETH_MIN: usize = 60;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const BROADCAST: [u8; 6] = [0xff; 6];
const ARP_LEN: usize = 28;
const IP_HLEN: usize = 20;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;

/// Our addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Me {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// What an answer frame answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Arp,
    Icmp,
    Udp,
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Ones' complement sum of `data` (big-endian 16-bit words, odd byte padded with zero) added
/// to `sum`, not yet folded.
pub fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a [`sum16`] into the final Internet checksum (ones' complement of the folded sum).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// RFC 1071 checksum of `data`. A block that contains its correct checksum sums to 0.
pub fn inet_checksum(data: &[u8]) -> u16 {
    fold(sum16(0, data))
}

/// Sum of the UDP/TCP pseudo header.
fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let s = sum16(0, src);
    let s = sum16(s, dst);
    s + u64::from(proto) + len as u64
}

fn eth_header(out: &mut [u8], dst: &[u8], src: &[u8; 6], ethertype: u16) {
    out[0..6].copy_from_slice(dst);
    out[6..12].copy_from_slice(src);
    put16(out, 12, ethertype);
}

/// Pads a frame of `len` bytes in `out` to the Ethernet minimum; returns the new length.
fn pad(out: &mut [u8], len: usize) -> usize {
    if len < ETH_MIN {
        out[len..ETH_MIN].fill(0);
        ETH_MIN
    } else {
        len
    }
}

fn arp(out: &mut [u8], me: &Me, eth_dst: &[u8], op: u16, tha: &[u8], tpa: &[u8]) -> usize {
    eth_header(out, eth_dst, &me.mac, ETHERTYPE_ARP);
    let a = &mut out[ETH_HLEN..ETH_HLEN + ARP_LEN];
    put16(a, 0, 1); // Ethernet
    put16(a, 2, ETHERTYPE_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a, 6, op);
    a[8..14].copy_from_slice(&me.mac);
    a[14..18].copy_from_slice(&me.ip);
    a[18..24].copy_from_slice(tha);
    a[24..28].copy_from_slice(tpa);
    pad(out, ETH_HLEN + ARP_LEN)
}

/// Builds the gratuitous ARP announcing `me` (a broadcast ARP request for our own address)
/// into `out` (>= 60 bytes); returns its length.
pub fn gratuitous_arp(me: &Me, out: &mut [u8]) -> usize {
    arp(out, me, &BROADCAST, 1, &[0; 6], &me.ip)
}

fn unicast_ip(ip: &[u8]) -> bool {
    ip[0] != 0 && ip[0] < 224 && ip != [255; 4]
}

/// Answers `frame` (see the module doc): the answer is written to `out` (must be at least
/// `max(frame.len(), 60)` bytes) and its kind and length are returned.
pub fn handle_frame(me: &Me, frame: &[u8], ip_id: u16, out: &mut [u8]) -> Option<(Kind, usize)> {
    if frame.len() < ETH_HLEN {
        return None;
    }
    let (dst, src) = (&frame[0..6], &frame[6..12]);
    if src[0] & 1 != 0 {
        return None; // multicast/broadcast source: never answer
    }
    let body = &frame[ETH_HLEN..];
    match be16(frame, 12) {
        ETHERTYPE_ARP if dst == me.mac || dst == BROADCAST => {
            if body.len() < ARP_LEN
                || be16(body, 0) != 1
                || be16(body, 2) != ETHERTYPE_IPV4
                || body[4] != 6
                || body[5] != 4
                || be16(body, 6) != 1
                || body[24..28] != me.ip
            {
                return None;
            }
            let (sha, spa) = (&body[8..14], &body[14..18]);
            if sha[0] & 1 != 0 || !unicast_ip(spa) {
                return None;
            }
            Some((Kind::Arp, arp(out, me, src, 2, sha, spa)))
        }
        ETHERTYPE_IPV4 if dst == me.mac => ipv4(me, src, body, ip_id, out),
        _ => None,
    }
}

fn ipv4(me: &Me, eth_src: &[u8], pkt: &[u8], ip_id: u16, out: &mut [u8]) -> Option<(Kind, usize)> {
    if pkt.len() < IP_HLEN || pkt[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(pkt[0] & 15) * 4;
    let total = usize::from(be16(pkt, 2));
    if hlen < IP_HLEN || total < hlen || total > pkt.len() {
        return None;
    }
    if inet_checksum(&pkt[..hlen]) != 0 {
        return None;
    }
    if be16(pkt, 6) & 0x3fff != 0 {
        return None; // a fragment (MF set or offset != 0)
    }
    let (proto, src, dst) = (pkt[9], &pkt[12..16], &pkt[16..20]);
    if dst != me.ip || !unicast_ip(src) {
        return None;
    }
    let data = &pkt[hlen..total];
    let reply = &mut out[ETH_HLEN + IP_HLEN..];
    let (kind, len) = match proto {
        PROTO_ICMP => {
            if data.len() < 8 || data[0] != 8 || data[1] != 0 || inet_checksum(data) != 0 {
                return None;
            }
            let r = &mut reply[..data.len()];
            r.copy_from_slice(data);
            r[0] = 0; // echo reply
            put16(r, 2, 0);
            let sum = inet_checksum(r);
            put16(r, 2, sum);
            (Kind::Icmp, data.len())
        }
        PROTO_UDP => {
            if data.len() < 8 {
                return None;
            }
            let ulen = usize::from(be16(data, 4));
            if ulen < 8 || ulen > data.len() {
                return None;
            }
            let data = &data[..ulen];
            if be16(data, 6) != 0
                && fold(pseudo_sum(src, dst, PROTO_UDP, ulen) + sum16(0, data)) != 0
            {
                return None;
            }
            let r = &mut reply[..ulen];
            r.copy_from_slice(data);
            r[0..2].copy_from_slice(&data[2..4]);
            r[2..4].copy_from_slice(&data[0..2]);
            put16(r, 6, 0);
            let sum = fold(pseudo_sum(&me.ip, src, PROTO_UDP, ulen) + sum16(0, r));
            put16(r, 6, if sum == 0 { 0xffff } else { sum });
            (Kind::Udp, ulen)
        }
        _ => return None,
    };
    // IPv4 header
    let h = &mut out[ETH_HLEN..ETH_HLEN + IP_HLEN];
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, (IP_HLEN + len) as u16);
    put16(h, 4, ip_id);
    put16(h, 6, 0x4000); // DF
    h[8] = 64;
    h[9] = proto;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(&me.ip);
    h[16..20].copy_from_slice(src);
    let sum = inet_checksum(h);
    put16(h, 10, sum);
    eth_header(out, eth_src, &me.mac, ETHERTYPE_IPV4);
    Some((kind, pad(out, ETH_HLEN + IP_HLEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Me = Me {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        ip: [10, 77, 0, 5],
    };
    const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    const PEER_IP: [u8; 4] = [10, 77, 0, 1];

    fn eth(dst: [u8; 6], ty: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&PEER_MAC);
        f.extend_from_slice(&ty.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn arp_request(tpa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&PEER_MAC);
        a.extend_from_slice(&PEER_IP);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa);
        eth(BROADCAST, ETHERTYPE_ARP, &a)
    }

    fn ip_packet(proto: u8, dst: [u8; 4], payload: &[u8], options: &[u8]) -> Vec<u8> {
        let hlen = 20 + options.len();
        let mut p = vec![0u8; hlen];
        p[0] = 0x40 | (hlen / 4) as u8;
        put16(&mut p, 2, (hlen + payload.len()) as u16);
        put16(&mut p, 4, 0x1234);
        p[8] = 63;
        p[9] = proto;
        p[12..16].copy_from_slice(&PEER_IP);
        p[16..20].copy_from_slice(&dst);
        p[20..].copy_from_slice(options);
        let sum = inet_checksum(&p);
        put16(&mut p, 10, sum);
        p.extend_from_slice(payload);
        p
    }

    fn icmp_echo(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let mut m = vec![8, 0, 0, 0];
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(data);
        let sum = inet_checksum(&m);
        put16(&mut m, 2, sum);
        m
    }

    fn udp(sport: u16, dport: u16, data: &[u8], dst: [u8; 4]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(data);
        let sum = fold(pseudo_sum(&PEER_IP, &dst, 17, u.len()) + sum16(0, &u));
        put16(&mut u, 6, if sum == 0 { 0xffff } else { sum });
        u
    }

    fn answer(frame: &[u8]) -> Option<(Kind, Vec<u8>)> {
        let mut out = vec![0xeeu8; 2048];
        handle_frame(&ME, frame, 7, &mut out).map(|(k, n)| (k, out[..n].to_vec()))
    }

    fn check_ip_reply(r: &[u8], proto: u8) -> &[u8] {
        assert_eq!(&r[0..6], &PEER_MAC);
        assert_eq!(&r[6..12], &ME.mac);
        assert_eq!(be16(r, 12), ETHERTYPE_IPV4);
        let ip = &r[14..];
        assert_eq!(ip[0], 0x45);
        assert_eq!(inet_checksum(&ip[..20]), 0);
        assert_eq!(ip[9], proto);
        assert_eq!(be16(ip, 4), 7);
        assert_eq!(&ip[12..16], &ME.ip);
        assert_eq!(&ip[16..20], &PEER_IP);
        &ip[20..usize::from(be16(ip, 2))]
    }

    #[test]
    fn checksum_known_values() {
        // RFC 1071 example: 0x0001 f203 f4f5 f6f7 sums to 0xddf2
        assert_eq!(
            inet_checksum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        // a real IPv4 header (checksum 0xb861)
        let h = [
            0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8,
            0, 0xc7,
        ];
        assert_eq!(inet_checksum(&h), 0);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(inet_checksum(&z), 0xb861);
        // odd length
        assert_eq!(inet_checksum(&[0xff]), !0xff00);
        assert_eq!(inet_checksum(&[]), 0xffff);
    }

    #[test]
    fn arp_reply_and_gratuitous() {
        let (k, r) = answer(&arp_request(ME.ip)).unwrap();
        assert_eq!(k, Kind::Arp);
        assert_eq!(r.len(), 60);
        assert_eq!(&r[0..6], &PEER_MAC);
        assert_eq!(&r[6..12], &ME.mac);
        assert_eq!(be16(&r, 12), ETHERTYPE_ARP);
        let a = &r[14..42];
        assert_eq!(&a[..8], &[0, 1, 8, 0, 6, 4, 0, 2]);
        assert_eq!(&a[8..14], &ME.mac);
        assert_eq!(&a[14..18], &ME.ip);
        assert_eq!(&a[18..24], &PEER_MAC);
        assert_eq!(&a[24..28], &PEER_IP);
        assert!(r[42..].iter().all(|&b| b == 0));
        // not for us, or a reply, or truncated
        assert_eq!(answer(&arp_request([10, 77, 0, 6])), None);
        let mut f = arp_request(ME.ip);
        f[21] = 2;
        assert_eq!(answer(&f), None);
        let f = arp_request(ME.ip);
        assert_eq!(answer(&f[..41]), None);
        // unicast ARP request to our MAC works, to another MAC does not
        let mut f = arp_request(ME.ip);
        f[0..6].copy_from_slice(&ME.mac);
        assert!(answer(&f).is_some());
        f[5] ^= 1;
        assert_eq!(answer(&f), None);

        let mut out = [0u8; 64];
        let n = gratuitous_arp(&ME, &mut out);
        assert_eq!(n, 60);
        assert_eq!(&out[0..6], &BROADCAST);
        assert_eq!(be16(&out, 14 + 6), 1);
        assert_eq!(&out[14 + 14..14 + 18], &ME.ip);
        assert_eq!(&out[14 + 24..14 + 28], &ME.ip);
    }

    #[test]
    fn icmp_echo_reply() {
        let data: Vec<u8> = (0..56u8).collect();
        let req = eth(
            ME.mac,
            ETHERTYPE_IPV4,
            &ip_packet(1, ME.ip, &icmp_echo(0xbeef, 3, &data), &[]),
        );
        let (k, r) = answer(&req).unwrap();
        assert_eq!(k, Kind::Icmp);
        assert_eq!(r.len(), req.len());
        let m = check_ip_reply(&r, 1);
        assert_eq!(m.len(), 8 + 56);
        assert_eq!((m[0], m[1]), (0, 0));
        assert_eq!(inet_checksum(m), 0);
        assert_eq!(be16(m, 4), 0xbeef);
        assert_eq!(be16(m, 6), 3);
        assert_eq!(&m[8..], &data[..]);
        // odd-length payload, IP options (dropped in the reply), Ethernet padding after the packet
        let req = ip_packet(1, ME.ip, &icmp_echo(1, 2, b"abc"), &[1, 1, 1, 0]);
        let mut f = eth(ME.mac, ETHERTYPE_IPV4, &req);
        f.extend_from_slice(&[0xaa; 20]);
        let (_, r) = answer(&f).unwrap();
        assert_eq!(r.len(), 60);
        let m = check_ip_reply(&r, 1);
        assert_eq!(m.len(), 11);
        assert_eq!(inet_checksum(m), 0);
        assert_eq!(&m[8..], b"abc");
    }

    #[test]
    fn ignored_ip_packets() {
        let good = ip_packet(1, ME.ip, &icmp_echo(1, 1, b"x"), &[]);
        assert!(answer(&eth(ME.mac, ETHERTYPE_IPV4, &good)).is_some());
        // other destination MAC / IP, broadcast frame
        assert_eq!(answer(&eth(PEER_MAC, ETHERTYPE_IPV4, &good)), None);
        assert_eq!(answer(&eth(BROADCAST, ETHERTYPE_IPV4, &good)), None);
        let other = ip_packet(1, [10, 77, 0, 6], &icmp_echo(1, 1, b"x"), &[]);
        assert_eq!(answer(&eth(ME.mac, ETHERTYPE_IPV4, &other)), None);
        // bad IP checksum
        let mut p = good.clone();
        p[8] ^= 1;
        assert_eq!(answer(&eth(ME.mac, ETHERTYPE_IPV4, &p)), None);
        // bad ICMP checksum
        let mut p = good.clone();
        p[28] ^= 1;
        assert_eq!(answer(&eth(ME.mac, ETHERTYPE_IPV4, &p)), None);
        // echo reply, other ICMP types, TCP
        let mut m = icmp_echo(1, 1, b"x");
        m[0] = 0;
        put16(&mut m, 2, 0);
        let s = inet_checksum(&m);
        put16(&mut m, 2, s);
        assert_eq!(
            answer(&eth(ME.mac, ETHERTYPE_IPV4, &ip_packet(1, ME.ip, &m, &[]))),
            None
        );
        assert_eq!(
            answer(&eth(
                ME.mac,
                ETHERTYPE_IPV4,
                &ip_packet(6, ME.ip, &[0; 20], &[])
            )),
            None
        );
        // fragments
        let mut p = good.clone();
        put16(&mut p, 6, 0x2000);
        put16(&mut p, 10, 0);
        let s = inet_checksum(&p[..20]);
        put16(&mut p, 10, s);
        assert_eq!(answer(&eth(ME.mac, ETHERTYPE_IPV4, &p)), None);
        // truncated (total length beyond the frame)
        let f = eth(ME.mac, ETHERTYPE_IPV4, &good);
        assert_eq!(answer(&f[..f.len() - 1]), None);
        // IPv6, VLAN, runt frames
        assert_eq!(answer(&eth(ME.mac, 0x86dd, &[0x60; 60])), None);
        assert_eq!(answer(&eth(ME.mac, 0x8100, &[0; 60])), None);
        assert_eq!(answer(&[0; 13]), None);
        // multicast source MAC
        let mut f = eth(ME.mac, ETHERTYPE_IPV4, &good);
        f[6] |= 1;
        assert_eq!(answer(&f), None);
    }

    #[test]
    fn udp_echo() {
        let payload = b"hello ferry";
        let req = eth(
            ME.mac,
            ETHERTYPE_IPV4,
            &ip_packet(17, ME.ip, &udp(40000, 7777, payload, ME.ip), &[]),
        );
        let (k, r) = answer(&req).unwrap();
        assert_eq!(k, Kind::Udp);
        let u = check_ip_reply(&r, 17);
        assert_eq!(be16(u, 0), 7777);
        assert_eq!(be16(u, 2), 40000);
        assert_eq!(usize::from(be16(u, 4)), 8 + payload.len());
        assert_eq!(&u[8..], payload);
        assert_eq!(
            fold(pseudo_sum(&ME.ip, &PEER_IP, 17, u.len()) + sum16(0, u)),
            0
        );
        // no checksum on the request: accepted; a reply always has one
        let mut d = udp(1, 2, b"", ME.ip);
        put16(&mut d, 6, 0);
        let (_, r) = answer(&eth(ME.mac, ETHERTYPE_IPV4, &ip_packet(17, ME.ip, &d, &[]))).unwrap();
        let u = check_ip_reply(&r, 17);
        assert_eq!(u.len(), 8);
        assert_ne!(be16(u, 6), 0);
        // bad checksum
        let mut d = udp(1, 2, b"data", ME.ip);
        d[9] ^= 0x40;
        assert_eq!(
            answer(&eth(ME.mac, ETHERTYPE_IPV4, &ip_packet(17, ME.ip, &d, &[]))),
            None
        );
        // UDP length beyond the IP payload
        let mut d = udp(1, 2, b"data", ME.ip);
        put16(&mut d, 4, 13);
        assert_eq!(
            answer(&eth(ME.mac, ETHERTYPE_IPV4, &ip_packet(17, ME.ip, &d, &[]))),
            None
        );
        // a large datagram fills a full 1514-byte frame and comes back the same size
        let big = vec![0x5a; 1472];
        let req = eth(
            ME.mac,
            ETHERTYPE_IPV4,
            &ip_packet(17, ME.ip, &udp(5, 6, &big, ME.ip), &[]),
        );
        assert_eq!(req.len(), 1514);
        let (_, r) = answer(&req).unwrap();
        assert_eq!(r.len(), 1514);
        assert_eq!(&check_ip_reply(&r, 17)[8..], &big[..]);
    }
}
