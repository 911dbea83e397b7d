//! MQTT: arbitrary bytes on a connection, either from the first byte (CONNECT parsing and
//! refusal) or after a valid CONNECT of `fuzz-device` (the session's packet handling).
#![no_main]

use bytes::BytesMut;
use iothub_emulator_fuzz::{device_token, feed, hub, DEVICE, HOST};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Connect;
use std::sync::OnceLock;

fn service() -> &'static iothub_emulator::transport::StreamService {
    static S: OnceLock<iothub_emulator::transport::StreamService> = OnceLock::new();
    S.get_or_init(|| iothub_emulator::mqtt::websocket_service(hub().clone()))
}

fn connect() -> &'static [u8] {
    static C: OnceLock<Vec<u8>> = OnceLock::new();
    C.get_or_init(|| {
        let mut connect = Connect::new(DEVICE);
        connect.keep_alive = 60;
        connect.set_login(
            format!("{HOST}/{DEVICE}/?api-version=2021-04-12"),
            device_token(),
        );
        let mut buf = BytesMut::new();
        connect.write(&mut buf).expect("CONNECT encodes");
        buf.to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        feed(service(), rest);
    } else {
        let mut input = connect().to_vec();
        input.extend_from_slice(rest);
        feed(service(), &input);
    }
});
