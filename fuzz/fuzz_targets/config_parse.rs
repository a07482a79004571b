#![no_main]
//! The configuration file as relayd reads it (TOML, then validation): no panic; a refused
//! file says where it came from, and every problem validation finds names its key and a
//! reason. Seeds: packaging/relay.toml and fuzz/seeds/config_parse.

use libfuzzer_sys::fuzz_target;
use relay::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text, "fuzz.toml") {
        Ok(config) => config,
        Err(err) => {
            assert!(err.to_string().starts_with("parsing fuzz.toml: "), "{err}");
            return;
        }
    };
    if let Err(err) = config.validate("fuzz.toml") {
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("validation gives problems: {err}");
        };
        assert!(!problems.is_empty());
        for problem in problems {
            assert!(
                !problem.key.is_empty() && !problem.reason.is_empty(),
                "{problem}"
            );
        }
    }
});
