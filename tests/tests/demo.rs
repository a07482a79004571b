//! `cargo xtask demo` keeps working: the demo binary, shortened to 4 s of calls, ends well,
//! every call's packets come back from the PBX, and the relay forwarded them in XDP.

use std::process::Command;

use relay_tests::require_root;

#[test]
fn the_demo_runs_its_calls_through_xdp_and_cleans_up() {
    require_root();
    let output = Command::new(env!("CARGO_BIN_EXE_demo"))
        .env("RELAY_DEMO_SECONDS", "4")
        .output()
        .expect("run the demo");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for call in 1..=3 {
        assert!(
            text.contains(&format!(
                "call {call}: 200 RTP packets sent, 200 came back from the PBX (0.00% lost)"
            )),
            "{text}"
        );
    }
    let share: f64 = text
        .split(" in the kernel)")
        .next()
        .and_then(|before| before.rsplit('(').next())
        .and_then(|share| share.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no kernel share in the summary: {text}"));
    assert!(share >= 98.0, "{text}");
    assert!(
        text.contains(" connected "),
        "the live calls table shows the calls connected: {text}"
    );
    assert!(text.contains("after the hangups: no calls"), "{text}");
}
