# Training: the MLflow parent run (once per study, before concurrent writers), each grid
# point's resolved config, then `moebench train` into its run directory.


rule mlflow_init:
    output:
        str(paths.parent_run_file("{study}")),
    params:
        study=STUDY_FILE,
        uri=STUDY.tracking.uri,
        experiment=STUDY.experiment,
    log:
        log_of("mlflow_init"),
    localrule: True
    conda:
        ENV
    shell:
        "moebench mlflow-init --study {params.study} --output {output} > {log} 2>&1"


rule resolve:
    output:
        str(paths.run_config_file(*W)),
    params:
        study=STUDY_FILE,
        digest=run_digest,
    log:
        log_of("resolve/{dataset}/{strategy}/seed~{seed}"),
    localrule: True
    conda:
        ENV
    shell:
        "moebench resolve --study {params.study} --dataset {wildcards.dataset}"
        " --strategy {wildcards.strategy} --seed {wildcards.seed} --output {output} > {log} 2>&1"


rule train:
    input:
        unpack(tracking_inputs),
        config=rules.resolve.output,
        data=data_files,
        # the kernel check gates training; re-checking later retrains nothing
        kernels=ancient(str(paths.kernels_file("{study}"))),
    output:
        run_patterns(TRAIN_FILES),
    params:
        out=parent_dir,
        ckpt=str(paths.ckpt_dir(*W)),
        parent=parent_run_arg,
        launch=train_launcher,
    log:
        log_of("train/{dataset}/{strategy}/seed~{seed}"),
    benchmark:
        str(paths.benchmark_file("{study}", "train/{dataset}/{strategy}/seed~{seed}"))
    threads: STUDY.resources.train.threads * STUDY.resources.train.tasks
    resources:
        **resources_of("train"),
    conda:
        ENV
    shell:
        "{params.launch} moebench train --config {input.config} --out {params.out} --ckpt-dir {params.ckpt}"
        " {params.parent} > {log} 2>&1"
