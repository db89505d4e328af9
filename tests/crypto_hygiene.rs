//! Crypto hygiene (issue 14, item 6): no `Debug` output shows a key, token or password, and
//! production X25519 keys come from the caller's CSPRNG.
//!
//! Every configuration type that holds a secret is formatted with `{:?}` and `{:#?}`, and the
//! output is searched for the secret as text, as hex and as the byte list a derived `Debug`
//! of a `Vec<u8>` or an array would print.

use std::net::SocketAddr;

use ring::rand::SystemRandom;
use usmp::nats::NatsConfig;
use usmp::ops::settings::Settings;
use usmp::ops::OpsOptions;
use usmp::proto::crypto::{EphemeralKey, Psk};
use usmp::proto::handshake::ClientHandshake;
use usmp::proto::testing::session_pair;
use usmp::psk::{to_hex, PskSource, Registry};
use usmp::{ClientConfig, Transport};

const KEY: &str = "the-device-key-SECRET-0123456789";
const KEY2: &str = "a-registry-key-SECRET-987654321";
const TOKEN: &str = "admin-token-SECRET-abcdefghijkl";
const PASSWORD: &str = "nats-password-SECRET-mnopqrstu";

/// The ways a secret could show up in formatted output.
fn forms(secret: &[u8]) -> Vec<String> {
    let list = format!("{:?}", &secret[..12]);
    vec![
        String::from_utf8_lossy(secret).into_owned(),
        to_hex(secret),
        // `[116, 104, …]` without its brackets: found inside a longer list too.
        list.trim_start_matches('[').trim_end_matches(']').to_string(),
        "SECRET".into(),
    ]
}

fn assert_hidden(what: &str, value: &dyn std::fmt::Debug, secrets: &[&[u8]]) {
    for out in [format!("{value:?}"), format!("{value:#?}")] {
        for s in secrets {
            for form in forms(s) {
                assert!(!out.contains(&form), "{what}: `{form}` appears in its Debug output: {out}");
            }
        }
    }
}

#[test]
fn no_config_type_prints_a_secret() {
    let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let cfg = ClientConfig::new(addr, KEY);
    assert_hidden("ClientConfig", &cfg, &[KEY.as_bytes()]);

    let settings = Settings {
        psk: Some(KEY.into()),
        psk_hex: Some(to_hex(KEY2.as_bytes())),
        admin_token: Some(TOKEN.into()),
        nats_password: Some(PASSWORD.into()),
        ..Default::default()
    };
    assert_hidden(
        "Settings",
        &settings,
        &[KEY.as_bytes(), KEY2.as_bytes(), TOKEN.as_bytes(), PASSWORD.as_bytes()],
    );

    let ops = OpsOptions { admin_token: Some(TOKEN.into()), ..Default::default() };
    assert_hidden("OpsOptions", &ops, &[TOKEN.as_bytes()]);

    let nats =
        NatsConfig { user: Some("gateway".into()), password: Some(PASSWORD.into()), ..Default::default() };
    assert_hidden("NatsConfig", &nats, &[PASSWORD.as_bytes()]);

    let text = format!("001122334455 {KEY}\n* hex:{}\n", to_hex(KEY2.as_bytes()));
    let reg = Registry::parse(&text, "keys").unwrap();
    assert_hidden("Registry", &reg, &[KEY.as_bytes(), KEY2.as_bytes()]);
    assert_hidden("PskSource::Registry", &PskSource::registry(reg), &[KEY.as_bytes(), KEY2.as_bytes()]);
    assert_hidden("PskSource::Single", &PskSource::single(KEY.as_bytes()).unwrap(), &[KEY.as_bytes()]);
    assert_hidden("Psk", &Psk::new(KEY.as_bytes()).unwrap(), &[KEY.as_bytes()]);

    let key = EphemeralKey::from_seed(&[0x5a; 32]).unwrap();
    let hs = ClientHandshake::new([1; 6], Psk::new(KEY.as_bytes()).unwrap(), key);
    assert_hidden("ClientHandshake", &hs, &[KEY.as_bytes(), &[0x5a; 32]]);
}

#[test]
fn sessions_do_not_print_their_keys() {
    let (c, s) = session_pair(Transport::Udp);
    let (tx, rx) = (*c.tx_key_bytes(), *c.rx_key_bytes());
    assert_hidden("client Session", &c, &[&tx, &rx]);
    assert_hidden("server Session", &s, &[&tx, &rx]);
}

#[test]
fn generated_keys_are_fresh_and_agree() {
    let rng = SystemRandom::new();
    let a = EphemeralKey::generate(&rng).unwrap();
    let b = EphemeralKey::generate(&rng).unwrap();
    assert_ne!(a.public(), b.public(), "two draws from the OS RNG gave the same key");
    let (pa, pb) = (*a.public(), *b.public());
    let (sa, sb) = (a.agree(&pb).unwrap(), b.agree(&pa).unwrap());
    assert_eq!(*sa, *sb);
    assert_ne!(*sa, [0u8; 32]);
}

#[test]
fn drawn_and_seeded_keys_agree() {
    // Production keys (ring) against the known-answer implementation (x25519-dalek), both
    // ways, several times: the two compute the same function.
    let rng = SystemRandom::new();
    for i in 0..8u8 {
        let drawn = EphemeralKey::generate(&rng).unwrap();
        let seeded = EphemeralKey::from_seed(&[i.wrapping_mul(37) ^ 0x5c; 32]).unwrap();
        let (pd, ps) = (*drawn.public(), *seeded.public());
        assert_eq!(*drawn.agree(&ps).unwrap(), *seeded.agree(&pd).unwrap());
    }
    // Low-order points (RFC 7748's list: 0, 1, and a point of order 8) are refused by the
    // production path too.
    let mut order8 = [0u8; 32];
    order8.copy_from_slice(
        &[
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
            0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
        ][..],
    );
    let mut one = [0u8; 32];
    one[0] = 1;
    for bad in [[0u8; 32], one, order8] {
        let k = EphemeralKey::generate(&rng).unwrap();
        assert_eq!(k.agree(&bad).unwrap_err().kind(), usmp::ErrorKind::Crypto);
    }
}
