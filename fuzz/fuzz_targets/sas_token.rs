//! SAS tokens: parsing, the resource they name, and verification against the device's key and
//! against the hub (device and policy tokens), which must never accept a forged signature.
#![no_main]

use iothub_emulator::auth::sas::SasToken;
use iothub_emulator::registry::IdentityKey;
use iothub_emulator_fuzz::{hub, DEVICE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = SasToken::parse(text) {
        if let Ok(resource) = token.resource() {
            let _ = resource.covers(&["devices", DEVICE]);
        }
        let _ = token.policy();
        let _ = token.string_to_sign();
        let _ = token.check_expiry(1_700_000_000);
    }
    // The fuzzer cannot forge an HMAC: nothing it writes may authenticate.
    let key = IdentityKey::device(DEVICE);
    assert!(hub().authenticate_device(&key, text).is_err());
});
