use serde_json::json;

use super::{Expected, Objects};
use crate::state::{Kind, ObjectKey, Origin, StateError};

fn etcd(key: &str) -> Origin {
    Origin::Etcd { key: key.into() }
}

fn service(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}
    })
}

fn expect_service(name: &str) -> Expected {
    Expected {
        kind: Kind::Service,
        key: ObjectKey {
            namespace: "shop".into(),
            name: name.into(),
        },
    }
}

#[test]
fn a_bad_update_keeps_the_last_good_version_and_names_the_key() {
    let mut objects = Objects::default();
    let key = "/mesh/core/Service/shop/web";
    objects
        .upsert(key, etcd(key), &service("web", "10.96.0.10"), None)
        .expect("valid");
    let mut bad = service("web", "10.96.0.11");
    bad["spec"]["ports"][0]["port"] = json!(70000);
    let errors = objects
        .upsert(key, etcd(key), &bad, None)
        .expect_err("invalid port");
    assert_eq!(
        errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [
            "etcd key /mesh/core/Service/shop/web (Service shop/web): spec.ports[0].port: 70000 is not a valid port (1-65535)"
        ]
    );
    let state = objects.state().expect("state");
    let ips: Vec<_> = state
        .services()
        .map(|(_, s)| s.spec.as_ref().and_then(|s| s.cluster_ip.clone()))
        .collect();
    assert_eq!(
        ips,
        [Some("10.96.0.10".to_owned())],
        "the last good version stays"
    );
}

#[test]
fn the_key_must_name_the_object() {
    let mut objects = Objects::default();
    let key = "/mesh/core/Service/shop/web";
    let errors = objects
        .upsert(
            key,
            etcd(key),
            &service("other", "10.96.0.10"),
            Some(&expect_service("web")),
        )
        .expect_err("mismatch");
    assert_eq!(
        errors[0].to_string(),
        "etcd key /mesh/core/Service/shop/web (Service shop/other): metadata: the key names Service shop/web, but the value is Service shop/other"
    );
    assert!(objects.is_empty());
    let errors = objects
        .upsert(
            key,
            etcd(key),
            &json!({"apiVersion": "v1", "kind": "List", "items": []}),
            None,
        )
        .expect_err("a list is no object");
    assert!(
        errors[0].message.contains("exactly one object"),
        "{errors:?}"
    );
}

#[test]
fn cross_object_conflicts_name_both_keys_and_removal_resolves_them() {
    let mut objects = Objects::default();
    for name in ["a", "b"] {
        let key = format!("/mesh/core/Service/shop/{name}");
        objects
            .upsert(
                &key,
                etcd(&key),
                &service(name, "10.96.0.10"),
                Some(&expect_service(name)),
            )
            .expect("each is valid alone");
    }
    let Err(StateError::Invalid(errors)) = objects.state() else {
        panic!("conflict accepted")
    };
    assert_eq!(
        errors[0].to_string(),
        "etcd key /mesh/core/Service/shop/b (Service shop/b): spec.clusterIP: cluster IP 10.96.0.10 is already used by Service shop/a (etcd key /mesh/core/Service/shop/a)"
    );
    assert!(objects.remove("/mesh/core/Service/shop/a"));
    assert!(!objects.remove("/mesh/core/Service/shop/a"));
    assert_eq!(objects.state().expect("resolved").services().len(), 1);
}

#[test]
fn api_origins_name_kind_namespace_and_name() {
    let mut objects = Objects::default();
    let origin = Origin::Api {
        kind: "Service".into(),
        namespace: "shop".into(),
        name: "web".into(),
    };
    let mut bad = service("web", "10.96.0.10");
    bad["spec"]["ports"][0]["port"] = json!(70000);
    let errors = objects
        .upsert("Service/shop/web", origin, &bad, None)
        .expect_err("invalid port");
    assert!(
        errors[0]
            .to_string()
            .starts_with("API Service shop/web (Service shop/web): spec.ports[0].port: "),
        "{}",
        errors[0]
    );
}

#[test]
fn fields_unknown_to_the_agent_reject_stored_objects_but_not_api_served_ones() {
    let mut newer = service("web", "10.96.0.10");
    newer["spec"]["futureField"] = json!(true);
    let key = "/mesh/core/Service/shop/web";
    let mut objects = Objects::default();
    let errors = objects
        .upsert(key, etcd(key), &newer, None)
        .expect_err("strict for what the mesh stores");
    assert!(
        errors[0]
            .to_string()
            .contains("spec.futureField: unknown field")
    );
    // The API server validated it against its own (newer) schema.
    let api = Origin::Api {
        kind: "Service".into(),
        namespace: "shop".into(),
        name: "web".into(),
    };
    objects
        .upsert("Service/shop/web", api, &newer, None)
        .expect("lenient for the API server's objects");
    assert_eq!(objects.state().expect("state").services().count(), 1);
}

/// The state, or the problems, as text: comparable whatever the order of changes.
fn outcome(objects: &Objects) -> Result<Vec<(String, Option<String>)>, Vec<String>> {
    match objects.state() {
        Ok(state) => Ok(state
            .services()
            .map(|(k, s)| {
                (
                    k.to_string(),
                    s.spec.as_ref().and_then(|s| s.cluster_ip.clone()),
                )
            })
            .collect()),
        Err(StateError::Invalid(errors)) => Err(errors.iter().map(ToString::to_string).collect()),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn a_patched_state_equals_one_assembled_from_scratch() {
    // Ids hold Services by name, some two ids one name (a duplicate), on three cluster
    // IPs (conflicts come and go).
    let mut objects = Objects::default();
    let mut held: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for step in 0..300 {
        let id = format!("id{}", next(6));
        if next(4) == 0 {
            objects.remove(&id);
            held.remove(&id);
        } else {
            let value = service(
                &format!("s{}", next(4)),
                &format!("10.96.0.{}", next(3) + 1),
            );
            objects
                .upsert(
                    &id,
                    Origin::Api {
                        kind: "Service".into(),
                        namespace: "shop".into(),
                        name: id.clone(),
                    },
                    &value,
                    None,
                )
                .expect("valid alone");
            held.insert(id.clone(), value);
        }
        let mut fresh = Objects::default();
        for (id, value) in &held {
            let origin = Origin::Api {
                kind: "Service".into(),
                namespace: "shop".into(),
                name: id.clone(),
            };
            fresh.upsert(id, origin, value, None).expect("valid alone");
        }
        assert_eq!(outcome(&objects), outcome(&fresh), "step {step}");
    }
}
