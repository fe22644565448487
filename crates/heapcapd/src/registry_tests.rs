//! The registry with ids that intake would refuse: a listener taken back from the holder comes
//! with whatever id an earlier heapcapd kept, so serving it must not depend on the id's shape.

use std::sync::Arc;
use std::time::{Duration, Instant};

use heapcap_holder::Held;
use heapcap_linux::journal::{Journal, Slot};
use heapcap_supervise::ExitWatcher;

use crate::events::Events;
use crate::registry::Registry;

#[test]
fn a_multi_byte_id_taken_back_from_the_holder_is_served_without_panicking() {
    let exits = Arc::new(ExitWatcher::start().unwrap());
    let registry = Registry::new(exits, Arc::new(Events::default()), None, None);
    let journal = Arc::new(Journal::create(1).unwrap());
    // Each 'é' is two bytes: the serving thread's name (11 characters of the id) cuts between them.
    let id = "é".repeat(20);
    let held = Held {
        container: id.clone(),
        pid: 0,
        record: serde_json::json!({"limit": null, "total_limit": null, "audit": false}),
        // Not a listener: serving it fails at once, and the container is dropped.
        listener: std::fs::File::open("/dev/null").unwrap().into(),
        slot: Slot::new(journal, 0).unwrap(),
    };
    registry.restore(held).expect("a thread serves it");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !registry.containers().is_empty() {
        assert!(Instant::now() < deadline, "the container was never dropped");
        std::thread::sleep(Duration::from_millis(10));
    }
}
