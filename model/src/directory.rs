//! A directory of manifests, read the way the standalone control plane reads its
//! config directory (weftctl reads it the same way): every `.yaml`, `.yml` and
//! `.json` file below it, hidden files skipped; only files whose size or mtime
//! changed are re-parsed. Reading files is the only I/O of this crate; watching the
//! directory is the control plane's.
//!
//! Fail static: an object is deleted only when its file is gone, or when its file
//! reads and parses and no longer defines it. An object whose document stops parsing
//! (a typo, a field the schema rejects), or whose file cannot be read or parsed as a
//! whole (a YAML syntax error, a half-written file), keeps its last good version;
//! the problem is reported naming the object ([`ManifestError::object_ref`]), and the
//! model reports the object stale.

use crate::manifest::{parse_manifests, ManifestError, Object, ObjectRef};
use crate::SourceEvent;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What is remembered of a file: its stamp, which objects it defined (with a hash
/// of their content, to tell changes apart without keeping a copy) and its errors.
struct Parsed {
    stamp: (SystemTime, u64),
    objects: Vec<(ObjectRef, u64)>,
    errors: Vec<ManifestError>,
    /// Objects of `objects` the file no longer yields because it could not be read or
    /// parsed as a whole: their last good version is kept.
    kept: Vec<ObjectRef>,
}

fn content_hash(o: &Object) -> u64 {
    use sha2::{Digest, Sha256};
    let bytes = match o {
        Object::Namespace(x) => serde_json::to_vec(x),
        Object::Pod(x) => serde_json::to_vec(x),
        Object::Service(x) => serde_json::to_vec(x),
        Object::ServiceAccount(x) => serde_json::to_vec(x),
        Object::AuthorizationPolicy(x) => serde_json::to_vec(x),
        Object::PeerAuthentication(x) => serde_json::to_vec(x),
        Object::RequestAuthentication(x) => serde_json::to_vec(x),
        Object::WasmPlugin(x) => serde_json::to_vec(x),
        Object::HttpRoute(x) => serde_json::to_vec(x),
        Object::GrpcRoute(x) => serde_json::to_vec(x),
        Object::ReferenceGrant(x) => serde_json::to_vec(x),
    }
    .unwrap_or_default();
    let d = Sha256::digest(bytes);
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn read_file(dir: &Path, path: &Path) -> (Vec<Object>, Vec<ManifestError>) {
    let shown = path.strip_prefix(dir).unwrap_or(path).display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_manifests(&shown, &text),
        Err(e) => (
            Vec::new(),
            vec![ManifestError {
                file: shown,
                message: format!("cannot read: {e}"),
                ..Default::default()
            }],
        ),
    }
}

/// Reads the directory, re-parsing only changed files. The first scan yields a
/// full snapshot; later scans yield only the objects of changed files that changed.
/// An object defined in two files is owned by the first file to define it (in path
/// order at start, otherwise the one that had it first); the other copy is reported.
#[derive(Default)]
pub struct DirectoryReader {
    files: BTreeMap<PathBuf, Parsed>,
    owner: HashMap<ObjectRef, PathBuf>,
    scanned: bool,
}

/// What a scan found: the events to apply, and every current problem.
pub struct Scan {
    pub event: SourceEvent,
    pub errors: Vec<ManifestError>,
}

impl DirectoryReader {
    /// Returns `None` when nothing changed since the last call.
    pub fn scan(&mut self, dir: &Path) -> std::io::Result<Option<Scan>> {
        let mut seen = Vec::new();
        collect_files(dir, &mut seen)?;
        let seen_paths: std::collections::HashSet<&PathBuf> = seen.iter().map(|(p, _)| p).collect();
        let mut touched: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen_paths.contains(p))
            .cloned()
            .collect();
        let mut old: HashMap<PathBuf, Parsed> = HashMap::new();
        for p in &touched {
            if let Some(parsed) = self.files.remove(p) {
                old.insert(p.clone(), parsed);
            }
        }
        let mut fresh: HashMap<PathBuf, Vec<Object>> = HashMap::new();
        for (path, stamp) in seen {
            if self.files.get(&path).is_some_and(|p| p.stamp == stamp) {
                continue;
            }
            let (objects, errors) = read_file(dir, &path);
            let hashes = objects
                .iter()
                .map(|o| (o.object_ref(), content_hash(o)))
                .collect();
            let parsed = Parsed {
                stamp,
                objects: hashes,
                errors,
                kept: Vec::new(),
            };
            if let Some(prev) = self.files.insert(path.clone(), parsed) {
                old.insert(path.clone(), prev);
            }
            fresh.insert(path.clone(), objects);
            touched.push(path);
        }
        if touched.is_empty() && self.scanned {
            return Ok(None);
        }
        let event = if !self.scanned {
            self.scanned = true;
            self.owner.clear();
            let mut all = Vec::new();
            for path in self.files.keys() {
                for o in fresh.remove(path).unwrap_or_default() {
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        self.owner.entry(o.object_ref())
                    {
                        e.insert(path.clone());
                        all.push(o);
                    }
                }
            }
            SourceEvent::Snapshot(all)
        } else {
            self.delta(dir, &touched, &old, fresh)
        };
        Ok(Some(Scan {
            event,
            errors: self.errors(),
        }))
    }

    fn delta(
        &mut self,
        dir: &Path,
        touched: &[PathBuf],
        old: &HashMap<PathBuf, Parsed>,
        mut fresh: HashMap<PathBuf, Vec<Object>>,
    ) -> SourceEvent {
        let mut apply = Vec::new();
        let mut released = Vec::new();
        for path in touched {
            let before: HashMap<&ObjectRef, u64> = old
                .get(path)
                .map(|p| p.objects.iter().map(|(r, h)| (r, *h)).collect())
                .unwrap_or_default();
            let now: Vec<Object> = fresh.remove(path).unwrap_or_default();
            let now_refs: std::collections::HashSet<ObjectRef> =
                now.iter().map(Object::object_ref).collect();
            // What the file (when it still exists) says about objects it no longer yields.
            let (broken, failing): (bool, std::collections::HashSet<ObjectRef>) =
                match self.files.get(path) {
                    Some(p) => (
                        p.errors.iter().any(|e| e.object_ref.is_none()),
                        p.errors
                            .iter()
                            .filter_map(|e| e.object_ref.clone())
                            .collect(),
                    ),
                    None => (false, Default::default()),
                };
            let mut kept = Vec::new();
            for (r, hash) in &before {
                if now_refs.contains(*r) || self.owner.get(*r) != Some(path) {
                    continue;
                }
                if failing.contains(*r) || broken {
                    // Fail static: the file is there but this object did not parse (or
                    // the file could not be read): keep its last good version.
                    kept.push(((*r).clone(), *hash, !failing.contains(*r)));
                } else {
                    self.owner.remove(*r);
                    released.push((*r).clone());
                }
            }
            kept.sort();
            if let Some(p) = self.files.get_mut(path) {
                for (r, hash, unnamed) in kept {
                    tracing::warn!(object = %r, file = %path.display(), "object no longer parses; its last good version stays in force");
                    p.objects.push((r.clone(), hash));
                    if unnamed {
                        p.kept.push(r);
                    }
                }
            }
            for o in now {
                let r = o.object_ref();
                match self.owner.get(&r) {
                    Some(p) if p != path => {} // duplicate; reported by errors()
                    Some(_) => {
                        if before.get(&r) != Some(&content_hash(&o)) {
                            apply.push(o);
                        }
                    }
                    None => {
                        self.owner.insert(r, path.clone());
                        apply.push(o);
                    }
                }
            }
        }
        // An object released by one file may still be defined by another: promote it.
        let mut delete = Vec::new();
        for r in released {
            let other_file = self
                .files
                .iter()
                .find(|(_, parsed)| parsed.objects.iter().any(|(x, _)| *x == r))
                .map(|(p, _)| p.clone());
            // Rare (a duplicate outlived its owner): re-read that file for the object.
            let other = other_file.and_then(|p| {
                read_file(dir, &p)
                    .0
                    .into_iter()
                    .find(|o| o.object_ref() == r)
                    .map(|o| (p, o))
            });
            match other {
                Some((p, o)) => {
                    self.owner.insert(r, p);
                    apply.push(o);
                }
                None => delete.push(r),
            }
        }
        SourceEvent::Changes { apply, delete }
    }

    fn errors(&self) -> Vec<ManifestError> {
        let mut errors = Vec::new();
        for (path, parsed) in &self.files {
            errors.extend(parsed.errors.iter().cloned());
            if let Some(cause) = parsed.errors.iter().find(|e| e.object_ref.is_none()) {
                for r in &parsed.kept {
                    errors.push(ManifestError {
                        file: cause.file.clone(),
                        document: cause.document,
                        object: Some(r.to_string()),
                        object_ref: Some(r.clone()),
                        generation: None,
                        field: cause.field.clone(),
                        message: format!("not found in the file, which has errors ({}); the last good version stays in force", cause.message),
                    });
                }
            }
            for (i, (r, _)) in parsed.objects.iter().enumerate() {
                if let Some(first) = self.owner.get(r).filter(|p| *p != path) {
                    errors.push(ManifestError {
                        file: path.display().to_string(),
                        document: i,
                        object: Some(r.to_string()),
                        field: Some("metadata.name".into()),
                        message: format!(
                            "duplicate: already defined in {}; this copy is ignored",
                            first.display()
                        ),
                        ..Default::default()
                    });
                }
            }
        }
        errors
    }
}

fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, (SystemTime, u64))>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // editor swap files, hidden state
        }
        let meta = entry.metadata()?;
        if meta.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push((path, (meta.modified()?, meta.len())));
        }
    }
    out.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> String {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
    }

    fn bump(p: &Path, text: &str) {
        // A different size guarantees the (mtime, size) stamp changes.
        std::fs::write(p, text).unwrap();
    }

    fn names(objs: &[Object]) -> Vec<String> {
        objs.iter().map(|o| o.object_ref().to_string()).collect()
    }

    #[test]
    fn first_scan_is_a_snapshot_then_only_deltas() {
        let d = tempfile::tempdir().unwrap();
        bump(
            &d.path().join("a.yaml"),
            &format!("{}---\n{}", ns("a"), ns("b")),
        );
        bump(&d.path().join("c.yaml"), &ns("c"));
        let mut r = DirectoryReader::default();
        let s = r.scan(d.path()).unwrap().unwrap();
        let SourceEvent::Snapshot(all) = s.event else {
            panic!("expected a snapshot")
        };
        assert_eq!(
            names(&all),
            vec!["Namespace a", "Namespace b", "Namespace c"]
        );
        assert!(r.scan(d.path()).unwrap().is_none(), "nothing changed");

        // Change one object of a.yaml: only it is applied.
        bump(
            &d.path().join("a.yaml"),
            &format!(
                "{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: b, labels: {{x: y}}}}\n",
                ns("a")
            ),
        );
        let s = r.scan(d.path()).unwrap().unwrap();
        let SourceEvent::Changes { apply, delete } = s.event else {
            panic!()
        };
        assert_eq!(names(&apply), vec!["Namespace b"]);
        assert!(delete.is_empty());

        // Remove c.yaml: c is deleted.
        std::fs::remove_file(d.path().join("c.yaml")).unwrap();
        let s = r.scan(d.path()).unwrap().unwrap();
        let SourceEvent::Changes { apply, delete } = s.event else {
            panic!()
        };
        assert!(apply.is_empty());
        assert_eq!(
            delete.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["Namespace c"]
        );
    }

    const DENY: &str = "apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
";
    const ALLOW: &str = "apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
";

    /// Scans and feeds the model the way the control plane's directory source does.
    fn feed(r: &mut DirectoryReader, dir: &Path, m: &crate::Model) {
        if let Some(s) = r.scan(dir).unwrap() {
            m.apply(SourceEvent::Errors(s.errors));
            m.apply(s.event);
        }
    }

    fn policy_keys(m: &crate::Model) -> Vec<String> {
        let st = m.read_state();
        let mut v: Vec<String> = st
            .entries
            .iter()
            .filter(|(k, _)| k.starts_with("AuthorizationPolicy/"))
            .map(|(k, e)| format!("{k}@{}", e.resource.version))
            .collect();
        v.sort();
        v
    }

    fn stale(m: &crate::Model) -> Vec<(String, String)> {
        m.stale()
            .into_iter()
            .map(|(r, s)| (r.to_string(), s.errors[0].to_string()))
            .collect()
    }

    #[test]
    fn an_object_that_stops_parsing_keeps_its_last_good_version() {
        let d = tempfile::tempdir().unwrap();
        let m = crate::Model::new(
            crate::ModelConfig {
                trust_domain: weft_proto::spiffe::TrustDomain::new("cluster.local").unwrap(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: String::new(),
                jwt_jwks: String::new(),
                default_identity_fallback: false,
            },
            std::sync::Arc::new(crate::modules::Offline),
        );
        let f = d.path().join("policies.yaml");
        bump(&f, &format!("{DENY}---\n{ALLOW}"));
        let mut r = DirectoryReader::default();
        feed(&mut r, d.path(), &m);
        let good = policy_keys(&m);
        assert_eq!(good.len(), 2, "{good:?}");

        // A typo in the DENY policy: the document no longer parses. Both policies stay
        // in force, unchanged; the DENY is reported stale, naming the field.
        bump(
            &f,
            &format!("{}---\n{ALLOW}", DENY.replace("namespaces:", "namespacez:")),
        );
        feed(&mut r, d.path(), &m);
        assert_eq!(policy_keys(&m), good);
        let s = stale(&m);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].0, "AuthorizationPolicy shop/deny-legacy");
        assert!(
            s[0].1.starts_with(
                "spec.rules[0].from[0].source.namespacez: policies.yaml document 0: unknown field"
            ),
            "{}",
            s[0].1
        );

        // A half-written file (YAML syntax error): nothing can be attributed, so every
        // object the file defined keeps its last good version.
        bump(&f, "apiVersion: security.weft.dev/v1alpha1\nkind: [Authori");
        feed(&mut r, d.path(), &m);
        assert_eq!(policy_keys(&m), good);
        let s = stale(&m);
        assert_eq!(
            s.iter().map(|(o, _)| o.as_str()).collect::<Vec<_>>(),
            vec![
                "AuthorizationPolicy shop/allow-web",
                "AuthorizationPolicy shop/deny-legacy"
            ]
        );
        assert!(s[0].1.contains("invalid YAML"), "{}", s[0].1);

        // Fixed, without the ALLOW policy: now the ALLOW is really gone.
        bump(&f, DENY);
        feed(&mut r, d.path(), &m);
        assert_eq!(policy_keys(&m), good[1..].to_vec());
        assert!(stale(&m).is_empty());

        // Broken again, then the file removed: deleting the file deletes its objects.
        bump(&f, "kind: [");
        feed(&mut r, d.path(), &m);
        assert_eq!(policy_keys(&m), good[1..].to_vec());
        std::fs::remove_file(&f).unwrap();
        feed(&mut r, d.path(), &m);
        assert!(policy_keys(&m).is_empty());
        assert!(stale(&m).is_empty());
    }

    #[test]
    fn duplicates_are_reported_and_promoted_when_the_owner_goes() {
        let d = tempfile::tempdir().unwrap();
        bump(&d.path().join("1.yaml"), &ns("dup"));
        bump(
            &d.path().join("2.yaml"),
            &format!("{}# second copy\n", ns("dup")),
        );
        let mut r = DirectoryReader::default();
        let s = r.scan(d.path()).unwrap().unwrap();
        assert_eq!(s.errors.len(), 1);
        assert!(s.errors[0].file.ends_with("2.yaml"));
        assert!(s.errors[0].message.starts_with("duplicate"));
        std::fs::remove_file(d.path().join("1.yaml")).unwrap();
        let s = r.scan(d.path()).unwrap().unwrap();
        let SourceEvent::Changes { apply, delete } = s.event else {
            panic!()
        };
        assert_eq!(
            names(&apply),
            vec!["Namespace dup"],
            "the other copy takes over"
        );
        assert!(delete.is_empty());
        assert!(s.errors.is_empty());
    }
}
