//! What a plugin's instances on a node share: key-value data with compare-and-swap
//! (`proxy_get/set_shared_data`) and named queues (`proxy_register/resolve/
//! enqueue/dequeue_shared_queue`, delivered by `proxy_on_queue_ready`).
//!
//! One [`Shared`] per plugin (`namespace/name`) per node, kept by the registry
//! across the plugin's reconfiguration (as a VM's shared data outlives a VM
//! reload in Envoy) and dropped with the plugin. Every size is bounded: a plugin
//! that asks for more gets an error status, never more memory.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use thiserror::Error;

/// Keys per plugin, at most.
pub const MAX_KEYS: usize = 1024;
/// A key's length, at most.
pub const MAX_KEY: usize = 256;
/// A value's (or queue item's) length, at most.
pub const MAX_VALUE: usize = 64 * 1024;
/// Keys and values of a plugin together, at most.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;
/// Queues per plugin, at most.
pub const MAX_QUEUES: usize = 16;
/// Items waiting in one queue, at most.
pub const MAX_QUEUE_ITEMS: usize = 1024;
/// Bytes waiting in one queue, at most.
pub const MAX_QUEUE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SharedError {
    #[error("not found")]
    NotFound,
    #[error("the value changed since it was read (CAS mismatch)")]
    CasMismatch,
    #[error("a key, name or value is empty or over its size limit")]
    BadArgument,
    #[error("the plugin's shared data or queue is full")]
    Full,
    #[error("the queue is empty")]
    Empty,
}

/// A queue's id, as the plugin sees it (never 0).
pub type QueueId = u32;

#[derive(Default)]
struct Data {
    entries: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    bytes: usize,
    last_cas: u32,
}

struct Queue {
    name: Vec<u8>,
    items: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The instance (slot) whose root context registered the queue last: it is
    /// told when items arrive.
    owner: usize,
    /// Items enqueued since the owner was last told (one call per item, as
    /// Envoy makes).
    unannounced: usize,
}

#[derive(Default)]
struct Queues {
    /// Index `i` has id `i + 1`.
    list: Vec<Queue>,
}

/// A plugin's shared data and queues on this node.
#[derive(Default)]
pub struct Shared {
    data: Mutex<Data>,
    queues: Mutex<Queues>,
}

impl Shared {
    /// The value of `key` and its CAS token.
    pub fn get(&self, key: &[u8]) -> Result<(Vec<u8>, u32), SharedError> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        d.entries.get(key).cloned().ok_or(SharedError::NotFound)
    }

    /// Sets `key` to `value`. A non-zero `cas` must equal the token of the value
    /// in place (if there is one); 0 sets unconditionally.
    pub fn set(&self, key: &[u8], value: &[u8], cas: u32) -> Result<(), SharedError> {
        if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(SharedError::BadArgument);
        }
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let old = d.entries.get(key).map(|(v, c)| (v.len(), *c));
        if let Some((_, current)) = old {
            if cas != 0 && cas != current {
                return Err(SharedError::CasMismatch);
            }
        }
        let bytes = match old {
            Some((len, _)) => d.bytes - len + value.len(),
            None => {
                if d.entries.len() >= MAX_KEYS {
                    return Err(SharedError::Full);
                }
                d.bytes + key.len() + value.len()
            }
        };
        if bytes > MAX_DATA_BYTES {
            return Err(SharedError::Full);
        }
        d.last_cas = d.last_cas.checked_add(1).unwrap_or(1);
        let token = d.last_cas;
        d.bytes = bytes;
        d.entries.insert(key.to_vec(), (value.to_vec(), token));
        Ok(())
    }

    /// Keys and bytes held.
    pub fn data_usage(&self) -> (usize, usize) {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        (d.entries.len(), d.bytes)
    }

    /// Registers the queue `name` for the root context of instance `owner`, which
    /// is told when items arrive; registering an existing name returns its id and
    /// makes `owner` the one told.
    pub fn register_queue(&self, name: &[u8], owner: usize) -> Result<QueueId, SharedError> {
        if name.is_empty() || name.len() > MAX_KEY {
            return Err(SharedError::BadArgument);
        }
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.list.iter().position(|x| x.name == name) {
            q.list[i].owner = owner;
            return Ok(i as QueueId + 1);
        }
        if q.list.len() >= MAX_QUEUES {
            return Err(SharedError::Full);
        }
        q.list.push(Queue {
            name: name.to_vec(),
            items: VecDeque::new(),
            bytes: 0,
            owner,
            unannounced: 0,
        });
        Ok(q.list.len() as QueueId)
    }

    /// The id of the queue `name`, registered by any instance.
    pub fn resolve_queue(&self, name: &[u8]) -> Result<QueueId, SharedError> {
        let q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        q.list
            .iter()
            .position(|x| x.name == name)
            .map(|i| i as QueueId + 1)
            .ok_or(SharedError::NotFound)
    }

    /// Appends `item` to queue `id`; [`Shared::take_ready`] then names the queue
    /// (the caller wakes the plugin's driver to tell the queue's owner).
    pub fn enqueue(&self, id: QueueId, item: &[u8]) -> Result<(), SharedError> {
        if item.len() > MAX_VALUE {
            return Err(SharedError::BadArgument);
        }
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let i = (id as usize).checked_sub(1).ok_or(SharedError::NotFound)?;
        let queue = q.list.get_mut(i).ok_or(SharedError::NotFound)?;
        if queue.items.len() >= MAX_QUEUE_ITEMS || queue.bytes + item.len() > MAX_QUEUE_BYTES {
            return Err(SharedError::Full);
        }
        queue.bytes += item.len();
        queue.items.push_back(item.to_vec());
        queue.unannounced += 1;
        Ok(())
    }

    /// The oldest item of queue `id`.
    pub fn dequeue(&self, id: QueueId) -> Result<Vec<u8>, SharedError> {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let i = (id as usize).checked_sub(1).ok_or(SharedError::NotFound)?;
        let queue = q.list.get_mut(i).ok_or(SharedError::NotFound)?;
        let item = queue.items.pop_front().ok_or(SharedError::Empty)?;
        queue.bytes -= item.len();
        Ok(item)
    }

    /// The queues that received items since last asked: each with the instance
    /// to tell and how many times (once per item enqueued and still there).
    pub fn take_ready(&self) -> Vec<(QueueId, usize, usize)> {
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let mut ready = Vec::new();
        for (i, queue) in q.list.iter_mut().enumerate() {
            let n = std::mem::take(&mut queue.unannounced).min(queue.items.len());
            if n > 0 {
                ready.push((i as QueueId + 1, queue.owner, n));
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_guards_concurrent_updates() {
        let s = Shared::default();
        assert_eq!(s.get(b"k"), Err(SharedError::NotFound));
        // A non-zero token on a missing key sets it (nothing to compare against).
        s.set(b"k", b"1", 0).unwrap();
        let (v, cas) = s.get(b"k").unwrap();
        assert_eq!(v, b"1");
        // Two instances read the same token; the first write wins.
        s.set(b"k", b"2", cas).unwrap();
        assert_eq!(s.set(b"k", b"3", cas), Err(SharedError::CasMismatch));
        let (v, cas2) = s.get(b"k").unwrap();
        assert_eq!(v, b"2");
        assert_ne!(cas2, cas);
        s.set(b"k", b"4", 0).unwrap();
        assert_eq!(s.get(b"k").unwrap().0, b"4");
        assert_eq!(s.data_usage(), (1, 2));
    }

    #[test]
    fn data_is_bounded() {
        let s = Shared::default();
        assert_eq!(s.set(b"", b"v", 0), Err(SharedError::BadArgument));
        let long_key = vec![b'k'; MAX_KEY + 1];
        assert_eq!(s.set(&long_key, b"v", 0), Err(SharedError::BadArgument));
        let big = vec![0u8; MAX_VALUE + 1];
        assert_eq!(s.set(b"k", &big, 0), Err(SharedError::BadArgument));
        let value = vec![0u8; MAX_VALUE];
        let mut stored = 0;
        for i in 0..MAX_KEYS {
            match s.set(format!("{i}").as_bytes(), &value, 0) {
                Ok(()) => stored += 1,
                Err(e) => {
                    assert_eq!(e, SharedError::Full);
                    break;
                }
            }
        }
        // 1 MiB of 64 KiB values: 15 fit with their keys, the 16th does not.
        assert_eq!(stored, MAX_DATA_BYTES / MAX_VALUE - 1);
        assert!(s.data_usage().1 <= MAX_DATA_BYTES);
        // Replacing a value with a smaller one frees room.
        s.set(b"0", b"", 0).unwrap();
        s.set(b"new", &value, 0).unwrap();
        // Many small keys: the key count is bounded too.
        let s = Shared::default();
        for i in 0..MAX_KEYS {
            s.set(format!("{i}").as_bytes(), b"", 0).unwrap();
        }
        assert_eq!(s.set(b"one more", b"", 0), Err(SharedError::Full));
        s.set(b"0", b"x", 0).unwrap();
    }

    #[test]
    fn queues_deliver_in_order_to_their_last_registrar() {
        let s = Shared::default();
        assert_eq!(s.resolve_queue(b"q"), Err(SharedError::NotFound));
        assert_eq!(s.enqueue(1, b"x"), Err(SharedError::NotFound));
        assert_eq!(s.enqueue(0, b"x"), Err(SharedError::NotFound));
        let id = s.register_queue(b"q", 0).unwrap();
        assert_eq!(id, 1);
        assert_eq!(s.register_queue(b"q", 3).unwrap(), id);
        assert_eq!(s.resolve_queue(b"q").unwrap(), id);
        assert_eq!(s.dequeue(id), Err(SharedError::Empty));
        assert!(s.take_ready().is_empty());
        s.enqueue(id, b"a").unwrap();
        s.enqueue(id, b"b").unwrap();
        assert_eq!(s.take_ready(), vec![(id, 3, 2)]);
        assert!(s.take_ready().is_empty());
        assert_eq!(s.dequeue(id).unwrap(), b"a");
        assert_eq!(s.dequeue(id).unwrap(), b"b");
        assert_eq!(s.dequeue(id), Err(SharedError::Empty));
        // Drained before the driver looked: nobody is told of items gone.
        s.enqueue(id, b"c").unwrap();
        s.enqueue(id, b"d").unwrap();
        s.dequeue(id).unwrap();
        assert_eq!(s.take_ready(), vec![(id, 3, 1)]);
        s.dequeue(id).unwrap();
        s.enqueue(id, b"e").unwrap();
        s.dequeue(id).unwrap();
        assert!(s.take_ready().is_empty());
    }

    #[test]
    fn queues_are_bounded() {
        let s = Shared::default();
        for i in 0..MAX_QUEUES {
            s.register_queue(format!("q{i}").as_bytes(), 0).unwrap();
        }
        assert_eq!(s.register_queue(b"one more", 0), Err(SharedError::Full));
        assert_eq!(s.register_queue(b"", 0), Err(SharedError::BadArgument));
        let big = vec![0u8; MAX_VALUE + 1];
        assert_eq!(s.enqueue(1, &big), Err(SharedError::BadArgument));
        for _ in 0..MAX_QUEUE_ITEMS {
            s.enqueue(1, b"x").unwrap();
        }
        assert_eq!(s.enqueue(1, b"x"), Err(SharedError::Full));
        s.dequeue(1).unwrap();
        s.enqueue(1, b"x").unwrap();
        let item = vec![0u8; MAX_VALUE];
        for _ in 0..MAX_QUEUE_BYTES / MAX_VALUE {
            s.enqueue(2, &item).unwrap();
        }
        assert_eq!(s.enqueue(2, b"x"), Err(SharedError::Full));
    }
}
