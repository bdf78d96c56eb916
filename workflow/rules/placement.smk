# Expert placement (docs/placement.md): fit every rule (contiguous, EPLB, search) on the
# first half of each run's routing trace, judge it on the second half, after `comm`; one
# table per study (Parquet + Markdown) and a figure of busiest/mean GPU load per strategy,
# under the output root (<out>/placement/<study>.*; committed ones in results/placement/).
PLACEMENT = paths.placement_file(STUDY_NAME)


rule placement:
    input:
        traces=run_files(["routing_trace.parquet"]),
        comm=run_files(COMM_FILES),
    output:
        table=str(PLACEMENT),
        md=str(PLACEMENT.with_suffix(".md")),
        layers=str(PLACEMENT.with_suffix(".layers.parquet")),
        png=str(PLACEMENT.with_suffix(".png")),
        svg=str(PLACEMENT.with_suffix(".svg")),
    params:
        # the study's run folder: <runs>/<dataset>/<strategy>/seed~<n>/routing_trace.parquet
        runs=lambda w, input: str(Path(input.traces[0]).parents[3]),
        study=STUDY_FILE,
    log:
        str(paths.log_file(STUDY_NAME, "placement")),
    localrule: True
    conda:
        ENV
    shell:
        "moebench placement --study {params.study} --runs {params.runs} --output {output.table} "
        "> {log} 2>&1"
