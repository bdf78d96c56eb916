# Expert placement (docs/placement.md): fit every rule (contiguous, EPLB, search) on the
# first half of each run's routing trace, judge it on the second half, after `comm`; one
# table per study (Parquet + Markdown) and a figure of busiest/mean GPU load per strategy.
PLACEMENT_STEM = f"{paths.RESULTS}/placement/{STUDY_NAME}"


rule placement:
    input:
        traces=run_files(["routing_trace.parquet"]),
        comm=run_files(COMM_FILES),
    output:
        table=f"{PLACEMENT_STEM}.parquet",
        md=f"{PLACEMENT_STEM}.md",
        layers=f"{PLACEMENT_STEM}.layers.parquet",
        png=f"{PLACEMENT_STEM}.png",
        svg=f"{PLACEMENT_STEM}.svg",
    params:
        runs=f"{paths.RESULTS}/runs/{STUDY_NAME}",
        settings=(
            f"--dispatch-bytes {STUDY.comm.dispatch_bytes} "
            f"--combine-bytes {STUDY.comm.combine_bytes} "
            f"--nvlink-gbps {STUDY.comm.nvlink_gbps} --ib-gbps {STUDY.comm.ib_gbps}"
            + (f" --hidden {STUDY.comm.hidden}" if STUDY.comm.hidden is not None else "")
        ),
    log:
        f"work/logs/{STUDY_NAME}/placement.log",
    localrule: True
    conda:
        ENV
    shell:
        "moebench placement --runs {params.runs} --out {output.table} {params.settings} "
        "> {log} 2>&1"
