use super::*;

fn rec(org: Uuid, id: &str) -> Record {
    Record {
        org_id: org,
        request_id: id.into(),
        agent_id: Uuid::nil(),
        token_id: Uuid::nil(),
        model: "m".into(),
        route: "/v1/chat/completions".into(),
        status: 200,
        prompt_tokens: 3,
        completion_tokens: 4,
        total_tokens: 7,
        cache_read_tokens: 0,
        cache_creation_tokens: 0,
        usage_source: "provider",
        streamed: false,
        started_at_ms: 1_700_000_000_123,
        duration_ms: 5,
        cost_usd: cost_text(0.000_015),
        provider: None,
        attempts: None,
    }
}

/// An org's chain of `batches` batches of `per` records, as authd stores it.
fn chain(org: Uuid, batches: i64, per: usize) -> (Vec<Batch>, Vec<Stored>, (i64, Vec<u8>)) {
    let mut prev = ZERO.to_vec();
    let (mut bs, mut rs) = (Vec::new(), Vec::new());
    for seq in 1..=batches {
        let mut hashes = Vec::new();
        for i in 0..per {
            let r = rec(org, &format!("r{seq}-{i}"));
            let h = row_hash(&r, seq).to_vec();
            hashes.push(h.clone());
            rs.push(Stored {
                record: r,
                batch_seq: seq,
                row_hash: h,
            });
        }
        let content = content_hash(hashes.iter().map(Vec::as_slice)).to_vec();
        let n = i32::try_from(per).expect("small");
        let hash = batch_hash(org, seq, n, &content, &prev).to_vec();
        bs.push(Batch {
            seq,
            records: n,
            content_hash: content,
            prev_hash: prev.clone(),
            batch_hash: hash.clone(),
        });
        prev = hash;
    }
    (bs, rs, (batches, prev))
}

/// The driver `ibexctl usage verify` runs, over vectors.
fn run(
    org: Uuid,
    bs: Vec<Batch>,
    rs: Vec<Stored>,
    head: Option<(i64, Vec<u8>)>,
) -> Result<u64, String> {
    let mut c = Checker::new(org);
    let mut bs = bs.into_iter();
    let mut current = 0;
    for r in &rs {
        while current < r.batch_seq {
            let Some(b) = bs.next() else { break };
            current = b.seq;
            c.batch(b)?;
        }
        c.record(r)?;
    }
    for b in bs {
        c.batch(b)?;
    }
    c.finish(head)
}

#[test]
fn cost_has_ten_decimals_like_numeric_20_10() {
    assert_eq!(cost_text(0.000_015).as_deref(), Some("0.0000150000"));
    assert_eq!(cost_text(12.5).as_deref(), Some("12.5000000000"));
    assert_eq!(cost_text(0.0).as_deref(), Some("0.0000000000"));
    assert_eq!(cost_text(f64::NAN), None);
    assert_eq!(cost_text(-1.0), None);
}

#[test]
fn canonical_form_is_length_prefixed_and_binds_every_field() {
    let org = Uuid::nil();
    let text = String::from_utf8(canonical(&rec(org, "a:b"), 3)).expect("utf8");
    assert!(text.starts_with("13:ibex-usage-v13:a:b1:m36:"), "{text}");
    assert!(text.ends_with("0:0:1:3"), "{text}");
    let base = row_hash(&rec(org, "x"), 1);
    let edits: Vec<fn(&mut Record)> = vec![
        |r| r.model = "n".into(),
        |r| r.prompt_tokens += 1,
        |r| r.completion_tokens += 1,
        |r| r.status = 500,
        |r| r.usage_source = "estimated",
        |r| r.streamed = true,
        |r| r.cost_usd = None,
        |r| r.provider = Some("p".into()),
        |r| r.agent_id = Uuid::max(),
        |r| r.started_at_ms += 1,
    ];
    for edit in edits {
        let mut r = rec(org, "x");
        edit(&mut r);
        assert_ne!(row_hash(&r, 1), base);
    }
    assert_ne!(row_hash(&rec(org, "x"), 2), base);
}

#[test]
fn from_pb_clamps_and_rejects_only_bad_ids() {
    let org = Uuid::new_v4();
    let mut p = rec(org, "req").to_pb();
    assert_eq!(Record::from_pb(&p).expect("valid"), rec(org, "req"));
    p.model = "x".repeat(1000);
    p.prompt_tokens = u64::MAX;
    p.cost_usd = Some(f64::INFINITY);
    let r = Record::from_pb(&p).expect("clamped");
    assert_eq!(r.model.len(), 256);
    assert_eq!(r.prompt_tokens, i64::MAX);
    assert_eq!(r.cost_usd, None);
    p.org_id = "nope".into();
    assert!(Record::from_pb(&p).is_err());
    let mut p = rec(org, "").to_pb();
    assert!(Record::from_pb(&p).is_err());
    p.request_id = "r".repeat(129);
    assert!(Record::from_pb(&p).is_err());
}

#[test]
fn intact_chain_verifies() {
    let org = Uuid::new_v4();
    let (bs, rs, head) = chain(org, 4, 3);
    assert_eq!(run(org, bs, rs, Some(head)), Ok(12));
    assert_eq!(run(org, vec![], vec![], None), Ok(0));
}

#[test]
fn each_kind_of_tampering_names_the_first_bad_record() {
    let org = Uuid::new_v4();
    let (bs, rs, head) = chain(org, 4, 3);

    let mut edited = rs.clone();
    edited[7].record.completion_tokens = 1;
    let err = run(org, bs.clone(), edited, Some(head.clone())).expect_err("edited");
    assert!(err.starts_with("record r3-1 (batch 3): content"), "{err}");

    let mut rehashed = rs.clone();
    rehashed[7].record.completion_tokens = 1;
    rehashed[7].row_hash = row_hash(&rehashed[7].record, 3).to_vec();
    let err = run(org, bs.clone(), rehashed, Some(head.clone())).expect_err("rehashed");
    assert!(
        err.contains("batch 3 (first record r3-0): records added or removed"),
        "{err}"
    );

    let mut deleted = rs.clone();
    deleted.remove(4);
    let err = run(org, bs.clone(), deleted, Some(head.clone())).expect_err("deleted");
    assert!(err.contains("batch 2 (first record r2-0)"), "{err}");

    let mut batch_gone = bs.clone();
    batch_gone.remove(1);
    let rs_gone: Vec<_> = rs.iter().filter(|s| s.batch_seq != 2).cloned().collect();
    let err = run(org, batch_gone, rs_gone, Some(head.clone())).expect_err("batch removed");
    assert!(err.contains("batch 2 is missing"), "{err}");

    let err =
        run(org, bs[..3].to_vec(), rs[..9].to_vec(), Some(head.clone())).expect_err("tail cut");
    assert!(err.contains("head is at batch 4"), "{err}");

    let mut moved = rs.clone();
    moved[0].batch_seq = 9;
    let err = run(org, bs.clone(), moved, Some(head.clone())).expect_err("orphan");
    assert!(
        err.contains("belongs to no batch") || err.contains("records added"),
        "{err}"
    );

    let err = run(Uuid::new_v4(), bs, rs, Some(head)).expect_err("other org's chain");
    assert!(err.contains("hash does not match"), "{err}");
}
