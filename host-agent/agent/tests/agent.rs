//! The agent's content map with real micro-VMs: it follows what the VMs
//! hold as they dirty pages, and forgets a VM that stops.

use std::time::Duration;

use pagecast_agent::Agent;
use pagecast_channel::Role;
use pagecast_channel::ca::Authority;
use pagecast_migrate::LocalContent;
use pagecast_pages::{PAGE_SIZE, PageHash};
use pagecast_proto::v1;
use pagecast_testkit::{Need, needs};

fn entries(a: &Agent) -> u64 {
    a.vm_list().content_entries
}

#[test]
fn the_content_map_follows_dirtying_vms_and_forgets_stopped_ones() {
    if !needs(
        "the_content_map_follows_dirtying_vms_and_forgets_stopped_ones",
        &[Need::Kvm],
    ) {
        return;
    }
    let a = Agent::new(
        "t",
        Authority::generate()
            .unwrap()
            .issue("t", Role::Host, 1)
            .unwrap(),
        None,
        2,
    )
    .unwrap();
    let ws = 256u64;
    a.vm_start(&v1::VmStartRequest {
        name: "busy".into(),
        synthetic: "web".into(),
        memory_bytes: 16 << 20,
        dirty_rate: 20_000,
        working_set_pages: ws,
        ..Default::default()
    })
    .unwrap();
    let start = entries(&a);
    assert!(start > 1000, "{start}");
    // Every write stores a new counter value: without dropping a frame's
    // old content the map would grow by the dirty rate.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        a.refresh_content();
    }
    let after = entries(&a);
    assert!(
        after <= start + ws,
        "the map grew from {start} to {after} entries"
    );

    a.vm_start(&v1::VmStartRequest {
        name: "quiet".into(),
        synthetic: "web:index=1".into(),
        memory_bytes: 16 << 20,
        ..Default::default()
    })
    .unwrap();
    let both = entries(&a);
    assert!(both > after);
    a.vm_stop("busy").unwrap();
    a.vm_stop("quiet").unwrap();
    assert_eq!(entries(&a), 0);
    // Nothing left to copy from.
    let mut page = [0u8; PAGE_SIZE];
    assert!(!a.copy(
        &pagecast_pages::ContentKey::CLUSTER,
        &PageHash::of_page(&[7u8; PAGE_SIZE]),
        &mut page
    ));
}
