//! What the MailDomain controller's watch caches hold, kind by kind, on a
//! live cluster: the heap each kind takes (measured by a counting
//! allocator, as the bytes a deep copy of its objects allocates), per
//! object and per MailDomain, and the index each store keeps beside its
//! objects (its table and keys; for the children, filed by domain, the
//! table of domains and each domain's record), beside the process's whole
//! heap once every store is filled; and, as the baseline, the gateway pods
//! as whole `Pod`s with their managed fields dropped (what a plain
//! reflector would keep) beside the cache's compact pods.
//!
//! Needs a cluster with domains in it (`KUBECONFIG`), for example one the
//! rollout benchmark left running. Prints figures; asserts nothing.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use k8s_openapi::api::{
    core::v1::{ConfigMap, Pod, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    api::ListParams,
    runtime::reflector::{Lookup, Store},
};
use pec_operator::controllers::mail_domain::{
    by_domain::{DomainRef, Held, Kind},
    cache,
    cached::{CachedChild, CachedDeployment, CachedPod, CachedSlice},
};

/// The system allocator, counting the bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only
// the count is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn in_use() -> isize {
    IN_USE.load(Ordering::Relaxed)
}

/// The heap a deep copy of `objects` allocates.
fn held<K: Clone>(objects: &[Arc<K>]) -> isize {
    let before = in_use();
    let copies: Vec<K> = objects.iter().map(|o| o.as_ref().clone()).collect();
    let bytes = in_use() - before;
    drop(copies);
    bytes
}

/// The number of `store`'s objects, [`held`] and [`index`] of them, from
/// one snapshot of the store.
fn both<K: Lookup<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
) -> ((usize, isize), isize) {
    let objects = store.state();
    ((objects.len(), held(&objects)), index(&objects))
}

/// The number of `C` children in `records` and the heap a deep copy of
/// them allocates (without the list that holds the copies).
fn children<C: Kind>(records: &[(DomainRef, Arc<Held>)]) -> (usize, isize) {
    let before = in_use();
    let copies: Vec<Vec<C>> = records.iter().map(|(_, h)| C::of(h).clone()).collect();
    let outer = (copies.capacity() * std::mem::size_of::<Vec<C>>()) as isize;
    let bytes = in_use() - before - outer;
    let n = copies.iter().map(Vec::len).sum();
    drop(copies);
    (n, bytes)
}

/// The heap the table of domains takes: its keys and each domain's record
/// without its children (what filing by domain costs per domain).
fn records_index(records: &[(DomainRef, Arc<Held>)]) -> isize {
    let before = in_use();
    let table: std::collections::HashMap<DomainRef, Arc<Held>> = records
        .iter()
        .map(|(domain, _)| (domain.clone(), Arc::new(Held::default())))
        .collect();
    let bytes = in_use() - before;
    drop(table);
    bytes
}

/// The heap the index of a store holding `objects` takes beside them: the
/// table and its keys (each a name, a namespace and the version it was
/// read at), built again one insert at a time, as the store builds it.
fn index<K: Lookup<DynamicType = ()>>(objects: &[Arc<K>]) -> isize {
    let before = in_use();
    let mut table = std::collections::HashMap::new();
    for object in objects {
        table.insert(object.to_object_ref(()), object.clone());
    }
    let bytes = in_use() - before;
    drop(table);
    bytes
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::try_default().await?;
    let start = in_use();
    // No controller reads the reconcile requests here: dropped, so they do
    // not pile up in the channel and count as the caches' memory.
    let (caches, requests) = cache::caches(&client);
    drop(requests);
    caches.ready().await?;
    // Let the stores settle (the initial lists' buffers go).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let total = in_use() - start;
    let domains = caches.mail_domains.state().len().max(1);
    println!(
        "{domains} MailDomains; every store filled: heap {:.1} MiB, {:.1} KiB per domain",
        total as f64 / 1048576.0,
        total as f64 / 1024.0 / domains as f64
    );
    let records = caches.children.all();
    let rows = [
        ("MailDomains", both(&caches.mail_domains)),
        ("Sites", both(&caches.sites)),
        ("SigningKeys", both(&caches.signing_keys)),
        ("Secrets", both(&caches.secrets)),
        ("ConfigMaps (platform)", both(&caches.routes)),
        (
            "domain records",
            ((records.len(), 0), records_index(&records)),
        ),
        ("Deployments", (children::<CachedDeployment>(&records), 0)),
        ("Pods", (children::<CachedPod>(&records), 0)),
        (
            "ConfigMaps (metadata)",
            (children::<CachedChild<ConfigMap>>(&records), 0),
        ),
        (
            "Services (metadata)",
            (children::<CachedChild<Service>>(&records), 0),
        ),
        (
            "PDBs (metadata)",
            (children::<CachedChild<PodDisruptionBudget>>(&records), 0),
        ),
        (
            "NetworkPolicies (metadata)",
            (children::<CachedChild<NetworkPolicy>>(&records), 0),
        ),
        ("EndpointSlices", (children::<CachedSlice>(&records), 0)),
    ];
    let (mut sum, mut indexes) = (0, 0);
    for (kind, ((n, bytes), index)) in rows {
        sum += bytes;
        indexes += index;
        println!(
            "  {kind:<28} {n:>7} objects {:>8.1} MiB {:>7.0} B each {:>6.1} KiB per domain; index {:>4.0} B each",
            bytes as f64 / 1048576.0,
            bytes as f64 / n.max(1) as f64,
            bytes as f64 / 1024.0 / domains as f64,
            index as f64 / n.max(1) as f64,
        );
    }
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/managed-by={}",
            pec_operator::controllers::MANAGED_BY
        )))
        .await?
        .items;
    let before = in_use();
    let whole: Vec<Pod> = pods
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.managed_fields_mut().clear();
            p
        })
        .collect();
    let baseline = in_use() - before;
    let (n, compact) = children::<CachedPod>(&records);
    let each = |bytes: isize, n: usize| bytes as f64 / n.max(1) as f64;
    println!(
        "  gateway pods: whole, managed fields dropped {:.0} B each; as the cache keeps them {:.0} B each; ratio {:.2}",
        each(baseline, whole.len()),
        each(compact, n),
        each(compact, n) / each(baseline, whole.len())
    );
    drop(whole);
    println!(
        "  the objects themselves: {:.1} MiB; the stores' indexes (tables, keys, domain records): {:.1} MiB; \
         the rest (the objects' shared headers, the watches' buffers): {:.1} MiB",
        sum as f64 / 1048576.0,
        indexes as f64 / 1048576.0,
        (total - sum - indexes) as f64 / 1048576.0
    );
    Ok(())
}
