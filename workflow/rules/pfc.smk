# BrainMass pseudo-FC views, one job per run: K views, each the correlation over a random subset of
# time points; seeds from (config seed, subject, run_id, view) are stored so any view can be rebuilt.
# Changing pfc.* re-runs only these jobs, never parcellation (the input is the time-series parquet).

PFC = {"n_views": 32, "keep_fraction": 0.8, "fisher_z": True, "dtype": "float16", "min_kept": 10,
       "method": "gram", **config.get("pfc", {})}



rule pfc:
    input:
        timeseries=LAYOUT.timeseries,
    output:
        pfc=LAYOUT.pfc,
        sidecar=LAYOUT.pfc_json,
    params:
        seed=int(config["seed"]),
        n_views=PFC["n_views"],
        keep_fraction=PFC["keep_fraction"],
        fisher_z=str(bool(PFC["fisher_z"])).lower(),
        dtype=PFC["dtype"],
        min_kept=PFC["min_kept"],
        method=PFC["method"],
    log:
        f"{RESULTS}/logs/pfc/sub-{{subject}}/{{run_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pfc/sub-{{subject}}/{{run_id}}.tsv",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        BF_ENV
    container:
        BF_IMAGE
    shell:
        "brainfoundry pfc {input.timeseries:q} --out {output.pfc:q} --sidecar {output.sidecar:q} "
        "--subject {wildcards.subject} --run-id {wildcards.run_id} --seed {params.seed} "
        "--n-views {params.n_views} --keep-fraction {params.keep_fraction} --fisher-z {params.fisher_z} "
        "--dtype {params.dtype} --min-kept {params.min_kept} --method {params.method} > {log:q} 2>&1"
