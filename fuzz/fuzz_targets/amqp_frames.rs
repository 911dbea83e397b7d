//! AMQP: arbitrary bytes on a connection, either from the first byte or after the AMQP
//! protocol header (frames, performatives, the frame-header shim).
#![no_main]

use iothub_emulator_fuzz::{feed, hub};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn service() -> &'static iothub_emulator::transport::StreamService {
    static S: OnceLock<iothub_emulator::transport::StreamService> = OnceLock::new();
    S.get_or_init(|| iothub_emulator::amqp::websocket_service(hub().clone()))
}

/// The AMQP 1.0 protocol header without SASL (`AMQP 0 1 0 0`) and with it (`AMQP 3 1 0 0`).
const HEADERS: [&[u8]; 2] = [b"AMQP\x00\x01\x00\x00", b"AMQP\x03\x01\x00\x00"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => feed(service(), rest),
        n => {
            let mut input = HEADERS[usize::from(n - 1)].to_vec();
            input.extend_from_slice(rest);
            feed(service(), &input);
        }
    }
});
