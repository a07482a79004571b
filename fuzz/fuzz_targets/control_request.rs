#![no_main]
//! Request lines of the control API (relayctl's JSON over the Unix socket) as the server
//! answers them, over a flow table in memory: no panic, every answer is a response with a
//! result or an error (never both, never neither), and a request that gets an error
//! changes nothing in the flow table. Seeds: fuzz/seeds/control_request.

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use relay::{
    config::Config,
    control::server::{Services, handle_line},
    datapath::{memory::Memory, table::FlowTable},
    reload::{Reload, Reloader},
};

fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| Services {
        table: Arc::new(FlowTable::new(Box::new(Arc::new(Memory::default())), 30, 1)),
        turn: None,
        signalling: None,
        calls: None,
        ng: None,
        reloader: Arc::new(Reloader::new(
            Config::default(),
            Reload {
                load: Box::new(|| Err("no configuration file while fuzzing".to_owned())),
                set_log_level: Box::new(|_| Ok(())),
            },
            None,
        )),
        admission: relay::admission::Admission::new(&Default::default(), 1024),
        cluster: None,
        started: std::time::Instant::now(),
    })
}

fuzz_target!(|data: &[u8]| {
    let services = services();
    let before: Vec<_> = services
        .table
        .list(1)
        .into_iter()
        .map(|flow| (flow.id, flow.generation, flow.spec))
        .collect();
    let response = handle_line(data, services);
    assert!(
        response.result.is_some() != response.error.is_some(),
        "a result or an error: {response:?}"
    );
    serde_json::to_vec(&response).expect("responses serialize");
    if response.error.is_some() {
        let after: Vec<_> = services
            .table
            .list(1)
            .into_iter()
            .map(|flow| (flow.id, flow.generation, flow.spec))
            .collect();
        assert_eq!(before, after, "an error changed the flow table: {response:?}");
    }
    // Keep the table from filling up for good: later inputs start from an empty one.
    for flow in services.table.list(1) {
        let _ = services.table.remove(flow.id, 1);
    }
});
