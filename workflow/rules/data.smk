# Data: the study's resolved data config, then `moebench data` (tokenizer + token files).


rule data_config:
    output:
        str(paths.data_config_file("{study}", "{dataset}")),
    params:
        study=STUDY_FILE,
        digest=data_digest,
    log:
        log_of("data_config/{dataset}"),
    localrule: True
    conda:
        ENV
    shell:
        "moebench resolve --study {params.study} --dataset {wildcards.dataset}"
        " --output {output} > {log} 2>&1"


rule data:
    input:
        rules.data_config.output,
    output:
        data_patterns(),
    params:
        out=parent_dir,
    log:
        log_of("data/{dataset}"),
    threads: STUDY.resources.data.threads
    resources:
        **resources_of("data"),
    conda:
        ENV
    shell:
        "moebench data --config {input} --out {params.out} > {log} 2>&1"
