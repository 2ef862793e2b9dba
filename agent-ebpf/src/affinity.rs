//! Session affinity by client address (`SERVICE_F_AFFINITY`): a client's
//! new connections go to the backend of its `AFFINITY` entry while the
//! entry is younger than the service's timeout and the backend still takes
//! new connections; otherwise the Maglev choice (of the client's address,
//! `select::first_hash`) is made and recorded. The entry is refreshed by
//! every new connection that uses it (kube-proxy's `recent` semantics: the
//! timeout counts from the client's last new connection), and moved by a
//! SYN-ACK from another backend (a retry took the connection elsewhere).
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference on purpose: by value they \
              would be copied onto the 512-byte BPF stack"
)]

use agent_common::{AffinityEntry, AffinityKey, FlowKey, Service};

use crate::{
    conntrack::now_seconds,
    maps::{AFFINITY, BACKENDS},
    select::is_ejected,
};

/// Sets `k` to the affinity key of the client of `flow` (its forward key,
/// client → VIP) at service `service_id`.
#[inline(always)]
fn key_of(k: &mut AffinityKey, service_id: u32, flow: &FlowKey) {
    k.service_id = service_id;
    k.family = flow.family;
    k._pad = [0; 3];
    k.client = flow.src;
}

/// Whether `backend_id` may take a new connection of service `service_id`:
/// still that service's backend (ids are reused: an entry may outlive its
/// backend) and neither ejected, draining (weight 0 included) nor removed.
#[inline(always)]
fn usable(service_id: u32, backend_id: u32) -> bool {
    BACKENDS
        .get(backend_id)
        .is_some_and(|b| b.service_id == service_id)
        && !is_ejected(backend_id)
}

/// The backend of the live, usable affinity entry of the client of `flow`
/// at `service`, refreshed for this new connection unless `refresh` is
/// false (an untracked RST follows the entry but is no new connection: a
/// forged one must not keep the entry alive). `k` is scratch space for the
/// key (too big for the stack).
#[inline(always)]
pub fn backend(
    k: &mut AffinityKey,
    service: &Service,
    flow: &FlowKey,
    refresh: bool,
) -> Option<u32> {
    key_of(k, service.id, flow);
    // SAFETY: a live map value; CPUs racing on it store the same kind of
    // value (a backend id and a time), either of which is right.
    let entry = unsafe { &mut *AFFINITY.get_ptr_mut(&*k)? };
    let now = now_seconds();
    // Saturating: another CPU may have stored a second later than `now`.
    if now.saturating_sub(entry.last_used_s) > service.affinity_timeout_s {
        return None;
    }
    let id = entry.backend_id;
    if !usable(service.id, id) {
        return None;
    }
    if refresh && entry.last_used_s != now {
        entry.last_used_s = now;
    }
    Some(id)
}

/// Makes `backend_id` the affinity of the client of `flow` at service
/// `service_id`: a new client's choice, or the backend that answered a
/// connect's SYN (after a retry, another than the entry names). An entry
/// that already says so is left as it is (no write per connect).
#[inline(always)]
pub fn record(k: &mut AffinityKey, service_id: u32, flow: &FlowKey, backend_id: u32) {
    key_of(k, service_id, flow);
    let now = now_seconds();
    if let Some(entry) = AFFINITY.get_ptr_mut(&*k) {
        // SAFETY: as in `backend`.
        let entry = unsafe { &mut *entry };
        if entry.backend_id == backend_id {
            return;
        }
        entry.backend_id = backend_id;
        entry.last_used_s = now;
        return;
    }
    let value = AffinityEntry {
        backend_id,
        last_used_s: now,
    };
    // Full and every entry recently used: the LRU evicts the oldest.
    let _ = AFFINITY.insert(&*k, &value, 0);
}
