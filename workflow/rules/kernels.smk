# Router kernels: checked against the torch reference (and benchmarked where a GPU is
# present) before any training run starts.


rule kernels:
    output:
        str(paths.kernels_file("{study}")),
    log:
        log_of("kernels"),
    threads: STUDY.resources.kernels.threads
    resources:
        **resources_of("kernels"),
    conda:
        ENV
    shell:
        "moebench kernels --output {output} > {log} 2>&1"
