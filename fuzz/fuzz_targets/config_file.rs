//! The config file loader: TOML in, seeds and policies out, or a clear error.
#![no_main]

use iothub_emulator::config::ConfigFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = ConfigFile::parse(text, "fuzz.toml") {
        let _ = file.seeds();
        let _ = file.policies();
    }
});
