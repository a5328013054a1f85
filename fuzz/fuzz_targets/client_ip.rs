//! The client-address chain: which address a request is charged to, from its peer and the
//! forwarding headers, and the `X-Forwarded-For` the gateway passes on. Checked: an untrusted
//! peer is the client whatever the headers say; a client prepending hops of its own changes
//! nothing unless every hop was a trusted proxy; and a backend reading what the gateway
//! forwards (the chain extended with the peer, or `X-Real-IP`) finds the same client.
#![no_main]

use std::net::{IpAddr, Ipv6Addr};

use arbitrary::Arbitrary;
use gatehouse_proxy::access::{
    client_ip::{self, ClientIpHeader},
    ip_list::IpList,
};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Net {
    Cidr(IpAddr, u8),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Hop {
    Addr(IpAddr),
    WithPort(IpAddr, u16),
    Bracketed(Ipv6Addr),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    peer: IpAddr,
    trusted: Vec<Net>,
    real_ip_mode: bool,
    forwarded: Vec<Vec<(Hop, u8)>>,
    real_ip: Vec<Hop>,
    forged: Vec<Hop>,
}

fn render(hop: &Hop) -> Vec<u8> {
    match hop {
        Hop::Addr(ip) => ip.to_string().into_bytes(),
        Hop::WithPort(ip, port) => std::net::SocketAddr::new(*ip, *port)
            .to_string()
            .into_bytes(),
        Hop::Bracketed(ip) => format!("[{ip}]").into_bytes(),
        Hop::Raw(bytes) => bytes.clone(),
    }
}

fn line(hops: &[(Hop, u8)]) -> Vec<u8> {
    let mut line = Vec::new();
    for (i, (hop, sep)) in hops.iter().enumerate() {
        if i > 0 {
            line.extend_from_slice([&b","[..], b", ", b" ,", b" , "][usize::from(sep % 4)]);
        }
        line.extend_from_slice(&render(hop));
    }
    line
}

fn synthetic(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if client_ip::is_unreadable_hop(v6))
}

fuzz_target!(|input: Input| {
    let nets: Vec<String> = input
        .trusted
        .iter()
        .map(|net| match net {
            Net::Cidr(ip, prefix) => format!("{ip}/{}", prefix % 129),
            Net::Text(text) => text.clone(),
        })
        .collect();
    let Ok(trusted) = IpList::parse(&nets) else {
        return;
    };
    let mode = if input.real_ip_mode {
        ClientIpHeader::XRealIp
    } else {
        ClientIpHeader::XForwardedFor
    };
    let mut lines: Vec<Vec<u8>> = input.forwarded.iter().map(|hops| line(hops)).collect();
    let mut headers = HeaderMap::new();
    for value in &lines {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append("x-forwarded-for", value);
        }
    }
    for hop in &input.real_ip {
        if let Ok(value) = HeaderValue::from_bytes(&render(hop)) {
            headers.append("x-real-ip", value);
        }
    }
    let peer = input.peer.to_canonical();
    let client = client_ip::client_ip(input.peer, &headers, &trusted, mode);

    // A peer in the discard prefix is never trusted, as a hop there is never.
    if trusted.is_empty() || synthetic(peer) || !trusted.contains(peer) {
        assert_eq!(client, peer, "an untrusted peer's headers were believed");
        return;
    }
    if mode == ClientIpHeader::XForwardedFor && headers.get("x-forwarded-for").is_none() {
        assert_eq!(client, peer);
    }

    // What a client can add: hops in front of the first line.
    if mode == ClientIpHeader::XForwardedFor && !input.forged.is_empty() {
        let mut forged: Vec<u8> = Vec::new();
        for hop in &input.forged {
            forged.extend_from_slice(&render(hop));
            forged.extend_from_slice(b", ");
        }
        match lines.first_mut() {
            Some(first) => {
                forged.extend_from_slice(first);
                *first = forged;
            }
            None => lines.push(forged[..forged.len() - 2].to_vec()),
        }
        let mut forged_headers = headers.clone();
        forged_headers.remove("x-forwarded-for");
        let mut readable = true;
        for value in &lines {
            match HeaderValue::from_bytes(value) {
                Ok(value) => {
                    forged_headers.append("x-forwarded-for", value);
                }
                Err(_) => readable = false,
            }
        }
        let with_forged = client_ip::client_ip(input.peer, &forged_headers, &trusted, mode);
        if readable && with_forged != client {
            assert!(
                // The trusted peer itself (even one in `100::/64`), or a trusted hop.
                client == peer || (trusted.contains(client) && !synthetic(client)),
                "hops forged in front of an untrusted hop changed the client: \
                 {client} -> {with_forged}"
            );
        }
    }

    // What the gateway forwards (`upstream_request_filter`), read by a backend that trusts
    // the same proxies and sees this one as its peer.
    let chain = match client_ip::forwarded_chain(&headers) {
        Some(chain) => format!("{chain}, {peer}"),
        None => peer.to_string(),
    };
    let forwarded =
        HeaderValue::from_str(&chain).expect("the forwarded chain is a valid header value");
    let mut upstream = HeaderMap::new();
    upstream.insert("x-forwarded-for", forwarded);
    upstream.insert(
        "x-real-ip",
        HeaderValue::from_str(&client.to_string()).expect("an address is a header value"),
    );
    assert_eq!(
        client_ip::client_ip(peer, &upstream, &trusted, ClientIpHeader::XRealIp),
        client,
        "X-Real-IP as forwarded names another client"
    );
    if mode == ClientIpHeader::XForwardedFor {
        assert_eq!(
            client_ip::client_ip(peer, &upstream, &trusted, mode),
            client,
            "the forwarded chain {chain:?} names another client"
        );
    }
});
