//! Stage 4: the backend for a new flow (or a retry): the Maglev slot of its
//! hash, skipping ejected backends.

use agent_common::{
    BackendState, FlowKey, MAGLEV_MAX_PICKS as MAX_PICKS, MAGLEV_MAX_WALK as MAX_WALK, NO_BACKEND,
    SERVICE_F_AFFINITY, Service, hash,
};

use crate::maps::{BACKEND_HEALTH, MAGLEV};

// MAX_PICKS: rehashes a connection tries while its choice is ejected,
// then MAX_WALK slots walked one by one (see `pick`): with half the
// backends ejected, all 40 miss a healthy one for about one connection in
// 10^12.

/// The hash a flow's Maglev choice starts from: its 5-tuple's, or for a
/// service with session affinity its client address's, so that a new
/// client's connections all have one first choice, the same on every node.
#[inline(always)]
pub fn first_hash(service: &Service, key: &FlowKey) -> u32 {
    if service.flags & SERVICE_F_AFFINITY != 0 {
        hash::client_hash(&key.src)
    } else {
        key.flow_hash()
    }
}

#[inline(always)]
pub fn is_ejected(backend_id: u32) -> bool {
    BACKEND_HEALTH
        .get(backend_id)
        .is_some_and(|health| health.ejected != BackendState::Active as u32)
}

/// The Maglev choice for a connection: the slot of its hash, and while that
/// backend is ejected (or is `exclude`, the one that just failed it), the
/// slot of a rehash. Every node with the same healthy set makes the same
/// choice, and an ejected backend's share spreads over all the others in
/// proportion to their weights. Returns the backend id and the attempt that
/// found it.
///
/// Rehashes alone would give up too often: with a third of the slots
/// ejected, one connection in 6,561 sees eight ejected slots in a row (and
/// one in 256 with half of them). After `MAX_PICKS` rehashes the walk goes
/// on slot by slot from the last one (still deterministic); only when
/// `MAX_WALK` more slots are all ejected does it fall back to the first
/// ejected choice (fail open).
#[inline(always)]
pub fn pick(service: &Service, h: u32, exclude: u32, first_attempt: u32) -> Option<(u32, u32)> {
    if service.table_size == 0 {
        return None;
    }
    let mut fallback = None;
    let mut attempt = first_attempt;
    let mut index = 0;
    while attempt < first_attempt + MAX_PICKS {
        let hh = if attempt == 0 {
            h
        } else {
            hash::rehash(h, attempt)
        };
        index = hh % service.table_size;
        match candidate(service, index, exclude)? {
            Candidate::Healthy(id) => return Some((id, attempt)),
            Candidate::Ejected(id) if fallback.is_none() => fallback = Some((id, attempt)),
            _ => {}
        }
        attempt += 1;
    }
    // A second loop rather than one with a branch inside: the verifier
    // explores the branch in every iteration, and one loop of 40 exceeded
    // its instruction budget ("Argument list too long").
    let mut step = 1;
    while step <= MAX_WALK {
        match candidate(service, (index + step) % service.table_size, exclude)? {
            Candidate::Healthy(id) => return Some((id, attempt)),
            Candidate::Ejected(id) if fallback.is_none() => fallback = Some((id, attempt)),
            _ => {}
        }
        step += 1;
    }
    fallback
}

enum Candidate {
    Healthy(u32),
    Ejected(u32),
    Excluded,
}

/// The backend in slot `index` of the service's live table; `None` for an
/// empty slot (a table being built) or one out of the map.
#[inline(always)]
fn candidate(service: &Service, index: u32, exclude: u32) -> Option<Candidate> {
    let id = *MAGLEV.get(service.table_offset + index)?;
    if id == NO_BACKEND {
        return None;
    }
    Some(if id == exclude {
        Candidate::Excluded
    } else if is_ejected(id) {
        Candidate::Ejected(id)
    } else {
        Candidate::Healthy(id)
    })
}
