#!/usr/bin/env python3
"""Turns the raw records of fault cases into figures and a table.

    report.py case  CASE_DIR     → CASE_DIR/result.json
    report.py table SUITE_DIR    → SUITE_DIR/faults.json and SUITE_DIR/faults.md
    report.py sync  SUITE_DIR    → the sync_interval section (part of `table`)

A case directory holds meta.json (written by run.sh), events.jsonl (fault timeline, wall
clock), samples.jsonl (gateway counters every 100 ms, faults/sampler.py), and the driver's
output: loadgen-*.json (+ loadgen.stderr, timestamped lines) or client.json (faults/client.py).

Recovery time ("resume"): deliveries are counted in 100 ms bins — the driver's own first
deliveries for client.py, the gateways' `gateway_items_delivered` counter for loadgen. Let r0 be
the mean per bin over the 5 s before the fault. Deliveries have resumed at the first bin t ≥ the
fault such that for 2 s from t every trailing 1 s window holds at least half of r0's 1 s count;
resume_s = t − fault (0.0: never interrupted). For kill-and-restart cases it is also given from
the restart (resume_after_restore_s); when deliveries went on through the fault, a dip caused by
the restart itself is restart_disturbance_s. worst_latency_after_fault_s is the highest send→deliver
latency of a message first delivered between the fault and 5 s after the restore (5 s after the
fault when nothing is restored); worst_latency_before_fault_s the same over the 5 s before.
Standard library only.
"""
import glob
import json
import os
import sys

BIN = 0.1
PRE_S = 5.0
WIN = 10  # bins: 1 s
HOLD = 20  # bins: 2 s
FRAC = 0.5


def load_jsonl(path):
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        pass
    return out


def sampler_bins(samples, metric="gateway_items_delivered"):
    """Per-100ms deltas of a counter summed over gateways (a restarted gateway starts again at 0)."""
    bins = {}
    last = {}
    for s in samples:
        if not s.get("ok"):
            continue
        url, v, ts = s["url"], s["m"].get(metric, 0.0), s["ts"]
        prev = last.get(url)
        last[url] = v
        if prev is None:
            continue
        d = v - prev if v >= prev else v  # reset: the new process counted from 0
        if d > 0:
            k = int(ts / BIN)
            bins[k] = bins.get(k, 0) + d
    return bins


def resume_after(bins, from_ts, end_ts, r0):
    """First 100 ms bin t ≥ from_ts such that, for every bin x in [t, t + 2 s), the 1 s window
    ending at x holds at least half the pre-fault count; seconds from from_ts."""
    if r0 <= 0:
        return None
    thr = FRAC * r0 * WIN
    fb = int(from_ts / BIN)
    eb = int(end_ts / BIN)
    ok = {}

    def healthy(x):
        if x not in ok:
            ok[x] = sum(bins.get(y, 0) for y in range(x - WIN + 1, x + 1)) >= thr
        return ok[x]

    for t in range(fb, eb - HOLD + 1):
        if all(healthy(x) for x in range(t, t + HOLD)):
            return round((t - fb) * BIN, 2)
    return None


def longest_gap(bins, from_ts, end_ts):
    """Longest run of 100 ms bins without a delivery, between from_ts and end_ts."""
    best = cur = 0
    for b in range(int(from_ts / BIN), int(end_ts / BIN)):
        if bins.get(b, 0) > 0:
            cur = 0
        else:
            cur += 1
            best = max(best, cur)
    return round(best * BIN, 2)


def first(events, name):
    for e in events:
        if e["event"] == name:
            return e["ts"]
    return None


def loadgen_t0(stderr_path):
    """loadgen starts sending 0.5 s after it prints 'sending for …' (chat::run)."""
    if not os.path.exists(stderr_path):
        return None
    with open(stderr_path) as f:
        for line in f:
            ts, _, rest = line.partition(" ")
            if "sending for" in rest:
                return float(ts) + 0.5
    return None


def case(d):
    meta = json.load(open(os.path.join(d, "meta.json")))
    events = load_jsonl(os.path.join(d, "events.jsonl"))
    samples = load_jsonl(os.path.join(d, "samples.jsonl"))
    fault = first(events, "fault")
    restore = first(events, "restore")
    # The moment the killed process was started again (or the link restored).
    restart = first(events, "restarted") or restore
    r = {
        "case": meta["case"],
        "fault": meta.get("fault"),
        "driver": meta.get("driver"),
        "exit_status": meta.get("exit_status"),
        "runtime_s": meta.get("runtime_s"),
        "fault_at": fault,
        "restore_at": restore,
        "down_s": round(restart - fault, 2) if fault and restart else None,
        "events": [{"t_s": round(e["ts"] - fault, 3) if fault else None, **e} for e in events],
        "notes": list(meta.get("notes", [])),
    }
    lat_bins = {}
    if meta.get("driver", "").startswith("loadgen"):
        js = sorted(glob.glob(os.path.join(d, "chat-*.json")))
        if not js:
            r["error"] = "loadgen wrote no results"
            return r
        doc = json.load(open(js[-1]))
        res = doc["results"]
        lg = res["ledger"]
        r.update(
            acknowledged=lg["acknowledged"],
            delivered=lg["delivered_once"],
            lost=lg["lost"],
            duplicates=lg["duplicates"],
            reordered=lg["reordered"],
            seq_regressions=lg["seq_regressions"],
            misdelivered=lg["misdelivered"] + lg["phantom"],
            issued=lg["issued"],
            failed=lg["failed"],
            unanswered=lg["unanswered"],
            delivered_unacknowledged=lg["delivered_unacknowledged"],
            redelivered=None,
            violations=res["violations"],
            verdict=res["verdict"],
            errors=res["errors"],
            connections_ended_early=res["connections_ended_early"],
            loadgen_json=os.path.basename(js[-1]),
            command_line=doc.get("command_line"),
            send_to_deliver=res["latency"]["send_to_deliver"],
        )
        bins = sampler_bins(samples)
        t0 = loadgen_t0(os.path.join(d, "loadgen.stderr"))
        send_end = (t0 + doc["config"]["duration_s"]) if t0 else None
        if t0:
            for row in res["timeline"]:
                # Row k covers (t0 + k − 1, t0 + k].
                k = int((t0 + row["t_s"] - BIN / 2) / BIN)
                lat_bins[k] = row["max_send_to_deliver_us"] / 1e6
        r["recovery_source"] = "gateway_items_delivered, 100 ms bins (sampler)"
    else:
        cj = os.path.join(d, "client.json")
        if not os.path.exists(cj):
            r["error"] = "client.py wrote no results"
            return r
        doc = json.load(open(cj))
        lg = doc["ledger"]
        if doc["mode"] == "chat":
            r.update(
                acknowledged=lg["acknowledged"],
                delivered=lg["delivered"],
                issued=lg["issued"],
                unanswered=lg["unanswered_at_end"],
                failed=lg["failed_final"],
                delivered_unacknowledged=lg["delivered_unacknowledged"],
                resends=lg["resends"],
                dup_flagged_ticks=lg["dup_flagged_ticks"],
            )
            send_end = doc["end"]
            rts = doc.get("reconnect_to_synced_s") or {}
            if rts.get("count"):
                # The users cut off by the fault are back when their reconnect has synced: that
                # is the recovery (the other users were never interrupted).
                r["resume_s"] = rts["max_s"]
                r["recovery_basis"] = "slowest reconnect→synced of the disconnected clients"
        else:
            r.update(
                acknowledged=lg["acknowledged"],
                posts=lg["posts"],
                recipients=lg["recipients"],
                expected_copies=lg["expected_copies"],
                delivered=lg["delivered"],
                members_complete=lg["members_complete"],
                sids_in_send_order=lg["sids_in_send_order"],
                failed=None,
                unanswered=lg["posts"] - lg["acknowledged"],
                copies_before_mark=doc.get("copies_before_mark"),
            )
            # Sending ends with the last post; deliveries go on: judge recovery up to the last copy.
            bl = [int(k) for k in doc["bins"]["first_deliveries"]]
            send_end = (max(bl) + 1) * BIN if bl else None
            sids = doc.get("sids") or []
            ct = {int(k): v for k, v in (doc.get("copy_times") or {}).items()}
            if ct:
                spans = sorted(v[-1] - v[0] for v in ct.values() if len(v) == lg["recipients"])
                r["fanout_span_median_s"] = round(spans[len(spans) // 2], 3) if spans else None
            if fault and ct:
                mark = doc.get("mark_after")
                msid = sids[mark] if mark is not None and mark < len(sids) else None
                if msid is not None:
                    r["marked_post_copies_before_kill"] = sum(1 for t in ct.get(msid, []) if t < fault)
                # Posts whose fan-out had begun but not finished when the router died.
                torn = [s for s, v in ct.items() if v and v[0] < fault and len([t for t in v if t < fault]) < lg["recipients"]]
                r["posts_torn_at_kill"] = len(torn)
                r["copies_missing_at_kill"] = sum(lg["recipients"] - len([t for t in ct[s] if t < fault]) for s in torn)
                if torn:
                    r["torn_posts_complete_after_s"] = round(max(ct[s][-1] for s in torn) - fault, 3)
                # Deliveries resumed: the first copy after the longest pause that follows the kill.
                times = sorted(t for v in ct.values() for t in v if t >= fault)
                horizon = (restore or restart or fault) + 10
                prev, best, at = fault, -1.0, None
                for t in times:
                    if t > horizon:
                        break
                    if t - prev > best:
                        best, at = t - prev, t
                    prev = t
                if at is not None:
                    r["resume_s"] = round(at - fault, 3)
                    if restart and at >= restart:
                        r["resume_after_restore_s"] = round(at - restart, 3)
                r["longest_delivery_gap_s"] = round(best, 3) if best >= 0 else None
        r.update(
            lost=lg["lost"],
            duplicates=lg["duplicates"],
            reordered=lg["reordered"],
            seq_regressions=lg["seq_regressions"],
            misdelivered=0,
            redelivered=lg["redelivered_same_seq"],
            violations=doc["violations"],
            reconnects=doc["reconnects"],
            disconnects=doc["disconnects"],
            connect_failures=doc["connect_failures"],
            reconnect_to_synced_s=doc["reconnect_to_synced_s"],
            errors=doc["errors"],
            send_to_deliver=doc["send_to_deliver"],
        )
        ex = doc.get("explain") or {}
        if ex.get("violations"):
            vs = ex["violations"]
            r["violation_examples"] = vs[:5]
            v0 = vs[0]
            if "sender" in v0:
                # The life of the first violating message and of the one after it, from the
                # sender's send to the receiver's delivery, in seconds from the fault.
                t0 = fault or 0
                story = {}
                for k in (v0["mseq"], v0["mseq"] + 1):
                    story[f"sender {v0['sender']} message {k}"] = [
                        [round(t - t0, 3), what, {kk: vv for kk, vv in (d or {}).items() if vv is not None}]
                        for t, what, d in ex.get("traces", {}).get(f"{v0['sender']}:{k}", [])
                    ]
                conn = ex.get("sender_connections", {}).get(str(v0["sender"]), [])
                story["sender connection"] = [[round(t - t0, 3), what, gen] for t, what, gen in conn]
                r["first_violation_story"] = story
        bins = {int(k): v for k, v in doc["bins"]["first_deliveries"].items()}
        lat_bins = {int(k): v for k, v in doc["bins"]["max_latency_s"].items()}
        r["recovery_source"] = "client first deliveries, 100 ms bins"
    if fault and bins:
        fb = int(fault / BIN)
        n_pre = int(PRE_S / BIN)
        r0 = sum(bins.get(b, 0) for b in range(fb - n_pre, fb)) / n_pre
        r["pre_fault_deliveries_per_s"] = round(r0 / BIN, 1)
        if send_end and "resume_s" not in r:
            r["resume_s"] = resume_after(bins, fault, send_end, r0)
            r.setdefault("longest_delivery_gap_s", longest_gap(bins, fault, send_end))
            rs = r.get("resume_s")
            if restart and "resume_after_restore_s" not in r and rs is not None:
                if fault + rs >= restart:
                    r["resume_after_restore_s"] = round(fault + rs - restart, 2)
                else:
                    # Deliveries never stopped until the restart: did the restart itself disturb them?
                    dip = resume_after(bins, restart, send_end, r0)
                    if dip:
                        r["restart_disturbance_s"] = dip
        upto = int(((restore or fault) + 5.0) / BIN)
        if send_end and r.get("resume_s") is not None:
            upto = max(upto, int((fault + r["resume_s"] + 5.0) / BIN))
        after = [v for k, v in lat_bins.items() if fb <= k <= upto]
        r["worst_latency_after_fault_s"] = round(max(after), 3) if after else None
        before = [v for k, v in lat_bins.items() if fb - n_pre <= k < fb]
        r["worst_latency_before_fault_s"] = round(max(before), 3) if before else None
    r["pass"] = (
        r.get("violations", 1) == 0
        and r.get("lost", 1) == 0
        and r.get("duplicates", 1) == 0
        and "error" not in r
    )
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(r, f, indent=2)
    return r


def fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}{unit}"
    return f"{v}{unit}"


def table(suite):
    meta = json.load(open(os.path.join(suite, "suite.json")))
    results = []
    for d in sorted(glob.glob(os.path.join(suite, "*/meta.json"))):
        cd = os.path.dirname(d)
        if os.path.basename(cd) == "sync-cost":
            continue
        rp = os.path.join(cd, "result.json")
        results.append(json.load(open(rp)) if os.path.exists(rp) else case(cd))
    order = meta.get("cases", [])
    results.sort(key=lambda r: order.index(r["case"]) if r["case"] in order else 99)
    sync = sync_results(suite)
    doc = {**meta, "results": [r for r in results if r["case"] != "sync-cost"], "sync_interval": sync}
    with open(os.path.join(suite, "faults.json"), "w") as f:
        json.dump(doc, f, indent=2)

    md = []
    md.append(f"# Fault injection — {meta['started_at']}\n")
    md.append(f"* machine: {meta['machine']}")
    md.append(f"* commit: `{meta['commit']}`{' (+ uncommitted changes, see source.txt)' if meta.get('dirty') else ''}")
    md.append(f"* nats-server: {meta['nats_version']}; binaries: {meta['build']}")
    md.append(f"* command: `{meta['command']}` ({meta['mode']}); total runtime {fmt(meta.get('runtime_s'), ' s')}")
    md.append(f"* JetStream sync_interval in the fault cases: {meta.get('sync_interval') or 'default (2m)'}\n")
    md.append(
        "| case | fault | driver | acknowledged | delivered | lost | duplicates | reordered | "
        "refused / unanswered sends | redelivered (same seq) | recovery | worst latency after fault | verdict |"
    )
    md.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in results:
        if r["case"] == "sync-cost":
            continue
        rec = fmt(r.get("resume_s"), " s")
        if r.get("resume_after_restore_s") is not None:
            rec += f" ({fmt(r['resume_after_restore_s'], ' s')} after the restart/restore)"
        if r.get("restart_disturbance_s"):
            rec += f"; {fmt(r['restart_disturbance_s'], ' s')} dip after the restart"
        if r.get("longest_delivery_gap_s") is not None:
            rec += f"; longest gap {fmt(r['longest_delivery_gap_s'], ' s')}"
        ref = f"{fmt(r.get('failed'))} / {fmt(r.get('unanswered'))}"
        verdict = "PASS" if r.get("pass") else ("ERROR: " + r["error"] if "error" in r else "**FAIL**")
        unit = " copies" if r.get("expected_copies") is not None else ""
        ack = fmt(r.get("acknowledged"))
        if r.get("expected_copies") is not None:
            ack = f"{r['acknowledged']} posts × {r['recipients']} = {r['expected_copies']} copies"
        md.append(
            f"| {r['case']} | {r.get('fault') or ''} | {r.get('driver') or ''} | {ack} | {fmt(r.get('delivered'))}{unit} | "
            f"{fmt(r.get('lost'))} | {fmt(r.get('duplicates'))} | {fmt(r.get('reordered'))} | {ref} | "
            f"{fmt(r.get('redelivered'))} | {rec} | {fmt(r.get('worst_latency_after_fault_s'), ' s')} | {verdict} |"
        )
    md.append("")
    md.append(
        "*acknowledged*: sends answered `sent` (group: posts answered `sent`, times recipients). "
        "*lost*: acknowledged, never delivered. *duplicates*: the same message delivered again under a "
        "new inbox seq (stored twice). *refused / unanswered*: sends answered `error` (e.g. "
        "`unavailable` while NATS was away; loadgen never retries them, client.py retries them with the "
        "same id) / never answered; neither is a loss, the sender was not told `sent`. *redelivered*: "
        "items re-sent with a seq the client already held after a reconnect (allowed by the protocol, "
        "dropped by seq; loadgen never reconnects). *recovery*: from the fault to deliveries back at "
        "≥ 50 % of the pre-fault rate (1 s windows) for 2 s (see faults/report.py); 0 = never "
        "interrupted. *worst latency after fault*: highest send→deliver latency of a message first "
        "delivered from the fault until 5 s after the restore (loadgen: per-second maxima).\n"
    )
    for r in results:
        if r["case"] == "sync-cost":
            continue
        md.append(f"## {r['case']}\n")
        md.append(f"{meta.get('descriptions', {}).get(r['case'], '')}\n")
        md.append("Timeline (seconds from the fault): " + ", ".join(
            f"{e['event']}{(' ' + e['detail']) if e.get('detail') else ''} @ {fmt(e['t_s'])}" for e in r.get("events", [])) + "\n")
        keys = [
            "issued", "failed", "unanswered", "delivered_unacknowledged", "misdelivered", "seq_regressions",
            "resends", "dup_flagged_ticks", "reconnects", "disconnects", "connect_failures",
            "reconnect_to_synced_s", "errors", "connections_ended_early", "copies_before_mark",
            "marked_post_copies_before_kill", "posts_torn_at_kill", "copies_missing_at_kill",
            "torn_posts_complete_after_s", "fanout_span_median_s", "members_complete", "sids_in_send_order", "pre_fault_deliveries_per_s",
            "worst_latency_before_fault_s", "recovery_basis", "restart_disturbance_s", "send_to_deliver", "down_s", "exit_status", "runtime_s",
            "command_line",
        ]
        md.append("| figure | value |\n|---|---|")
        for k in keys:
            if r.get(k) not in (None, {}, []):
                v = r[k]
                md.append(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |")
        for n in r.get("notes", []):
            md.append(f"\n{n}")
        if r.get("violation_examples"):
            md.append("\nFirst violations: `" + json.dumps(r["violation_examples"][:3]) + "`")
        if r.get("first_violation_story"):
            md.append("\nWhat happened to the first one (seconds from the fault; `gen`: connection number of the "
                      "client concerned — the sender for send/sent/error, the receiver for delivered):\n")
            for k, v in r["first_violation_story"].items():
                md.append(f"* {k}: `{json.dumps(v)}`")
        md.append("")
    md.append(sync_markdown(sync))
    with open(os.path.join(suite, "faults.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print(os.path.join(suite, "faults.md"))
    bad = [r["case"] for r in results if r["case"] != "sync-cost" and not r.get("pass")]
    return 1 if bad else 0


# --- the sync_interval cost ------------------------------------------------------------------

def q_ms(summary, q):
    v = (summary or {}).get(f"{q}_us")
    return v / 1000 if isinstance(v, (int, float)) else None


def one_round(vd):
    v = {}
    b = sorted(glob.glob(os.path.join(vd, "baseline-*.json")))
    if b:
        pub = json.load(open(b[-1]))["results"]["publish"]
        v["baseline_msgs_per_s"] = pub["msgs_per_s"]
        v["baseline_ack_p50_ms"] = q_ms(pub.get("publish_to_ack"), "p50")
        v["baseline_ack_p99_ms"] = q_ms(pub.get("publish_to_ack"), "p99")
    for kind in ("max", "open"):
        c = sorted(glob.glob(os.path.join(vd, kind, "chat-*.json")))
        if c:
            doc = json.load(open(c[-1]))
            res = doc["results"]
            v[f"{kind}_delivered_per_s"] = res["throughput"]["delivered_per_s"]
            v[f"{kind}_sent_p50_ms"] = q_ms(res["latency"]["send_to_sent"], "p50")
            v[f"{kind}_sent_p99_ms"] = q_ms(res["latency"]["send_to_sent"], "p99")
            v[f"{kind}_deliver_p50_ms"] = q_ms(res["latency"]["send_to_deliver"], "p50")
            v[f"{kind}_deliver_p99_ms"] = q_ms(res["latency"]["send_to_deliver"], "p99")
            v[f"{kind}_violations"] = res["violations"]
            v[f"{kind}_command"] = doc.get("command_line")
    jc = os.path.join(vd, "jetstream-config.json")
    if os.path.exists(jc):
        try:
            cfg = json.load(open(jc))
            v["server_sync_always"] = cfg.get("sync_always", False)
            v["server_sync_interval_ns"] = cfg.get("sync_interval")
        except ValueError:
            pass
    return v


def sync_results(suite):
    d = os.path.join(suite, "sync-cost")
    if not os.path.isdir(d):
        return None
    meta = {}
    m = os.path.join(d, "sync-meta.json")
    if os.path.exists(m):
        meta = json.load(open(m))
    out = {"meta": meta, "variants": {}}
    for vdir in sorted(glob.glob(os.path.join(d, "r*-*"))):
        name = os.path.basename(vdir)
        rounds = [one_round(r) for r in sorted(glob.glob(os.path.join(vdir, "round-*")))]
        mean = {}
        for k in {k for r in rounds for k in r}:
            vals = [r[k] for r in rounds if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
            if vals and not k.endswith("_command"):
                mean[k] = sum(vals) / len(vals)
        out["variants"][name] = {"rounds": rounds, "mean": mean}
    return out


SYNC_ROWS = [
    ("baseline: raw JetStream publish (msg/s)", "baseline_msgs_per_s"),
    ("baseline: publish→ack p50 (ms)", "baseline_ack_p50_ms"),
    ("baseline: publish→ack p99 (ms)", "baseline_ack_p99_ms"),
    ("chat --rate max: delivered (msg/s)", "max_delivered_per_s"),
    ("chat --rate max: send→sent p50 (ms)", "max_sent_p50_ms"),
    ("chat --rate max: send→sent p99 (ms)", "max_sent_p99_ms"),
    ("chat 1000 msg/s open loop: delivered (msg/s)", "open_delivered_per_s"),
    ("chat 1000 msg/s open loop: send→sent p50 (ms)", "open_sent_p50_ms"),
    ("chat 1000 msg/s open loop: send→sent p99 (ms)", "open_sent_p99_ms"),
    ("chat 1000 msg/s open loop: send→deliver p99 (ms)", "open_deliver_p99_ms"),
]


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


def rnd(v):
    if isinstance(v, float):
        return round(v, 2) if v < 100 else round(v)
    return v


def sync_markdown(s):
    if not s or not s.get("variants"):
        return ""
    md = ["## JetStream `sync_interval`: the cost of `always`\n"]
    meta = s.get("meta", {})
    if meta.get("description"):
        md.append(meta["description"] + "\n")
    V = s["variants"]
    for nodes in ("r1", "r3"):
        d, a = V.get(f"{nodes}-default"), V.get(f"{nodes}-always")
        if not d or not a:
            continue
        label = "one nats-server, streams R1" if nodes == "r1" else "3-node cluster, streams R3"
        md.append(f"### {label}\n")
        md.append("| figure | default (2m) | always | always / default |\n|---|---:|---:|---:|")
        for lab, k in SYNC_ROWS:
            dv, av = d["mean"].get(k), a["mean"].get(k)
            if dv is None and av is None:
                continue
            md.append(f"| {lab} | {fmt(rnd(dv))} | {fmt(rnd(av))} | {fmt(ratio(av, dv))} |")
        viol = sum((r.get("max_violations") or 0) + (r.get("open_violations") or 0) for x in (d, a) for r in x["rounds"])
        sa = [r.get("server_sync_always") for r in a["rounds"]]
        md.append(f"\nLedger violations in these runs: {viol}. Servers of the `always` runs reported "
                  f"`sync_always: {fmt(sa[0]) if sa else '?'}` in /varz.\n")
    if meta.get("how_to"):
        md.append(meta["how_to"])
    return "\n".join(md)


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("case", "table"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "case":
        r = case(sys.argv[2])
        print(json.dumps({k: r.get(k) for k in (
            "case", "acknowledged", "delivered", "lost", "duplicates", "reordered", "failed", "unanswered",
            "redelivered", "resume_s", "resume_after_restore_s", "worst_latency_after_fault_s", "pass")}))
        return 0 if r.get("pass") else 1
    return table(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
