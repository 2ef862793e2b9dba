//! The registry against the built object.

use std::collections::BTreeSet;

use super::*;

/// The registry is the one list of names: it must match the object.
#[test]
fn the_registry_names_every_map_and_program_of_the_object() {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
    let in_object: BTreeSet<&str> = obj
        .maps
        .keys()
        .map(String::as_str)
        // The benchmark's programs and aya-log's ring are not the agent's.
        .filter(|n| !n.starts_with("BENCH_") && *n != "AYA_LOGS")
        .filter(|n| !n.starts_with('.'))
        .collect();
    let registered: BTreeSet<&str> = MAPS.iter().map(|m| m.name).collect();
    assert_eq!(in_object, registered);

    let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
    let mut named = vec![program::XDP, program::TC, program::SOCK_STATE];
    named.extend([program::TCP_RESET, program::SOCK_RELEASE]);
    named.extend([program::RESYN_XDP, program::RESYN_TC]);
    named.extend([
        program::ENCAP_XDP,
        program::ENCAP_TC,
        program::DECAP,
        program::DECAP_MSS,
    ]);
    named.extend(program::SOCKET);
    for name in named {
        assert!(
            programs.contains(name),
            "program {name} is not in the object"
        );
    }
}
