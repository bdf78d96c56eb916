# moebench: one DAG from data to paper tables.
#   data -> kernel check -> training runs (study x dataset x strategy x seed) -> comm
#   profiling -> aggregation (per-study summary, tables, figures) -> `snakemake --report`.
# Rules only call the `moebench` CLI (`python -m moebench` of Snakemake's interpreter); the study grid comes from the config, validated
# against workflow/schemas/study.schema.json and then by pydantic (moebench.config).
#   snakemake --cores 2                                   # the default study
#   snakemake --cores 2 --configfile configs/test.yaml    # any other study
#   snakemake --workflow-profile workflow/profiles/slurm --configfile configs/gpu.yaml


# The default study, unless study files are given (`--configfile` would otherwise merge
# into it: a study's strategies would add to the default ones).
if not workflow.overwrite_configfiles:

    configfile: "configs/default.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/kernels.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/comm.smk"
include: "workflow/rules/placement.smk"
include: "workflow/rules/aggregate.smk"


onsuccess:
    for line in log_warnings():
        print(line, file=sys.stderr)


onstart:
    problem = slurm_partition_problem()
    if problem:
        raise WorkflowError(
            f"{problem}; allowed: a partition name, set in the profile "
            "(default-resources: slurm_partition: <name>) or by "
            "--default-resources slurm_partition=<name>"
        )
    problem = memory_problem()
    if problem:
        raise WorkflowError(problem)


# The run files are listed too: Snakemake regenerates a missing intermediate file only when
# a target needs it, so this makes a deleted run (and what depends on it) rerun.
rule all:
    default_target: True
    input:
        rules.aggregate.output,
        run_files(paths.RUN_FILES),
