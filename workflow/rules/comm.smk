# Communication: replay each run's routing trace on the study topology (devices and nodes
# per token, NVLink/IB bytes, modeled all-to-all time) into the same run directory.


rule comm:
    input:
        trace=run_patterns(["routing_trace.parquet"]),
    output:
        run_patterns(COMM_FILES),
    params:
        out=parent_dir,
        study=STUDY_FILE,
    log:
        log_of("comm/{dataset}/{strategy}/seed~{seed}"),
    threads: STUDY.resources.comm.threads
    resources:
        **resources_of("comm"),
    conda:
        ENV
    shell:
        "moebench comm --study {params.study} --trace {input.trace} --out {params.out} > {log} 2>&1"
