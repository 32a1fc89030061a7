{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "specserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "specserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "specserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object's metadata (not on pod templates: see specserve.podLabels). */}}
{{- define "specserve.labels" -}}
helm.sh/chart: {{ include "specserve.chart" . }}
app.kubernetes.io/name: {{ include "specserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of a component's pods: the selector labels and nothing that changes with a chart or
app version, so that a chart bump alone does not restart engines (images carry the version). */}}
{{- define "specserve.podLabels" -}}
{{ include "specserve.selectorLabels" . }}
app.kubernetes.io/part-of: specserve
{{- end }}

{{/* Stable selector labels of one component (gateway or engine): never change across upgrades. */}}
{{- define "specserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "specserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "specserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository:tag@digest; registry = the image's, else imageRegistry; tag = appVersion. */}}
{{- define "specserve.image" -}}
{{- $registry := .image.registry | default .root.Values.imageRegistry | default "" | trimSuffix "/" }}
{{- $ref := printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end }}
{{- if .image.digest }}{{ $ref = printf "%s@%s" $ref .image.digest }}{{ end }}
{{- $ref }}
{{- end }}

{{/* Headless Service of the engine pods: the gateway resolves it to find every replica. */}}
{{- define "specserve.engineHeadless" -}}
{{- printf "%s-engine-headless" (include "specserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "specserve.authSecretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-api-keys" (include "specserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Claim of the shared download cache: the given one, else the chart's. */}}
{{- define "specserve.modelCacheClaim" -}}
{{- with .Values.model.download.cache }}
{{- if .claimName }}{{ .claimName }}{{ else if .create }}{{ printf "%s-model-cache" (include "specserve.fullname" $) }}{{ end }}
{{- end }}
{{- end }}

{{/* Model directory inside the engine container; "" = the demo model of the image. */}}
{{- define "specserve.modelDir" -}}
{{- if eq .Values.model.source "demo" }}
{{- else if eq .Values.model.source "download" }}
{{- printf "/models/%s/%s" .Values.model.download.repo (include "specserve.modelRevision" .) }}
{{- else if .Values.model.path }}
{{- printf "/models/%s" (trimPrefix "/" .Values.model.path) }}
{{- else }}
{{- print "/models" }}
{{- end }}
{{- end }}

{{/* vLLM --speculative-config JSON; "" when speculation is off (drafter "" or "none").
"recycling" (Token Recycling), "medusa" and "hydra" (heads; checkpoint in speculation.heads, or the
demo model's) are specserve's drafters, run as vLLM custom_class proposers; "vllm-medusa" is vLLM's
own Medusa proposer (set config.model to a converted checkpoint). */}}
{{- define "specserve.speculativeConfig" -}}
{{- $drafter := .Values.speculation.drafter | default "none" }}
{{- if ne $drafter "none" }}
{{- $k := int .Values.speculation.numSpeculativeTokens }}
{{- $budget := int (.Values.speculation.treeBudget | default 0) }}
{{- if gt $budget 0 }}
{{- if eq (.Values.speculation.tree | default "chain") "chain" }}
{{- fail "speculation.treeBudget needs speculation.tree static or dynamic (chains draft numSpeculativeTokens tokens)" }}
{{- end }}
{{- $k = $budget }}
{{- end }}
{{- $cfg := dict "method" $drafter "num_speculative_tokens" $k }}
{{- if eq $drafter "recycling" }}
{{- $_ := set $cfg "method" "custom_class" }}
{{- $_ := set $cfg "model" "specserve_vllm.drafters.recycling_proposer.RecyclingProposer" }}
{{- end }}
{{- if has $drafter (list "medusa" "hydra") }}
{{- $_ := set $cfg "method" "custom_class" }}
{{- $_ := set $cfg "model" (printf "specserve_vllm.heads.proposer.%sProposer" (title $drafter)) }}
{{- end }}
{{- if eq $drafter "vllm-medusa" }}
{{- $_ := set $cfg "method" "medusa" }}
{{- end }}
{{- if eq $drafter "ngram" }}
{{- $cfg = merge $cfg (.Values.speculation.config | default dict) }}
{{- else }}
{{- $cfg = merge $cfg (omit (.Values.speculation.config | default dict) "prompt_lookup_min" "prompt_lookup_max") }}
{{- end }}
{{- toJson $cfg }}
{{- end }}
{{- end }}


{{/* The pinned download revision; fails unless it is a 40-character commit hash. */}}
{{- define "specserve.modelRevision" -}}
{{- $rev := .Values.model.download.revision | default "" }}
{{- if not (regexMatch "^[0-9a-f]{40}$" $rev) }}
{{- fail (printf "model.download.revision must be a 40-character commit hash (got %q): a branch such as main changes under running replicas" $rev) }}
{{- end }}
{{- $rev }}
{{- end }}

{{/* vLLM --tensor-parallel-size: engine.gpus unless set, and then it must equal engine.gpus. */}}
{{- define "specserve.tensorParallelSize" -}}
{{- $gpus := int .Values.engine.gpus }}
{{- $tp := int (.Values.engine.tensorParallelSize | default 0) }}
{{- if eq .Values.engine.device "gpu" }}
{{- if and $tp (ne $tp $gpus) }}
{{- fail (printf "engine.tensorParallelSize (%d) must equal engine.gpus (%d): each tensor-parallel rank takes one GPU of the pod" $tp $gpus) }}
{{- end }}
{{- $gpus }}
{{- else }}
{{- if gt $tp 1 }}
{{- fail "engine.tensorParallelSize above 1 needs engine.device=gpu" }}
{{- end }}
{{- 1 }}
{{- end }}
{{- end }}

{{/* Seconds the startup probe allows for model loading. */}}
{{- define "specserve.startupBudget" -}}
{{- $p := .Values.engine.startupProbe }}
{{- add (int ($p.initialDelaySeconds | default 0)) (mul (int ($p.periodSeconds | default 10)) (int ($p.failureThreshold | default 3))) }}
{{- end }}

{{/* Engine Deployment progress deadline: the given one (at least the startup budget), else budget + 300. */}}
{{- define "specserve.progressDeadline" -}}
{{- $budget := int (include "specserve.startupBudget" .) }}
{{- $given := int (.Values.engine.progressDeadlineSeconds | default 0) }}
{{- if $given }}
{{- if le $given $budget }}
{{- fail (printf "engine.progressDeadlineSeconds (%d) must exceed the startup probe's budget (%d s): the rollout would be reported failed while a model still loads" $given $budget) }}
{{- end }}
{{- $given }}
{{- else }}
{{- add $budget 300 }}
{{- end }}
{{- end }}

{{/* Engine rollout strategy: the given one, else by device (gpu never needs a spare GPU). */}}
{{- define "specserve.engineStrategy" -}}
{{- if .Values.engine.strategy }}
{{- toYaml .Values.engine.strategy }}
{{- else if eq .Values.engine.device "gpu" }}
type: RollingUpdate
rollingUpdate: {maxSurge: 0, maxUnavailable: 1}
{{- else }}
type: RollingUpdate
rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
{{- end }}
{{- end }}

{{/* terminationGracePeriodSeconds of a component: given (at least the drain sum) or the sum plus a margin.
dict: root, preStop, drain, given, margin, what */}}
{{- define "specserve.gracePeriod" -}}
{{- $sum := add (int .preStop) (int .drain) }}
{{- $given := int (.given | default 0) }}
{{- if $given }}
{{- if lt $given $sum }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) is below preStopSleepSeconds + drain (%d): the kubelet would kill in-flight requests" .what $given $sum) }}
{{- end }}
{{- $given }}
{{- else }}
{{- add $sum (int .margin) }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget spec body; fails when minAvailable would block every drain. dict: cfg, replicas, what */}}
{{- define "specserve.pdbSpec" -}}
{{- $pdb := .cfg.pdb }}
{{- if and (not (kindIs "invalid" $pdb.minAvailable)) (not (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail (printf "%s.pdb: set maxUnavailable or minAvailable, not both" .what) }}
{{- end }}
{{- if not (kindIs "invalid" $pdb.minAvailable) }}
{{- if and (kindIs "float64" $pdb.minAvailable) (ge (int $pdb.minAvailable) (int .replicas)) }}
{{- fail (printf "%s.pdb.minAvailable (%d) with %d replica(s) blocks every node drain: use maxUnavailable" .what (int $pdb.minAvailable) (int .replicas)) }}
{{- end }}
{{- if and (kindIs "int64" $pdb.minAvailable) (ge (int $pdb.minAvailable) (int .replicas)) }}
{{- fail (printf "%s.pdb.minAvailable (%d) with %d replica(s) blocks every node drain: use maxUnavailable" .what (int $pdb.minAvailable) (int .replicas)) }}
{{- end }}
minAvailable: {{ $pdb.minAvailable }}
{{- else }}
maxUnavailable: {{ $pdb.maxUnavailable | default 1 }}
{{- end }}
{{- end }}

{{/* Secret names of the client keys and the engine key. */}}
{{- define "specserve.engineKeySecretName" -}}
{{- .Values.engineAuth.existingSecret | default (printf "%s-engine-key" (include "specserve.fullname" .)) }}
{{- end }}

{{/* A generated secret value that survives upgrades: the stored one when the Secret exists
(`lookup`; empty under `helm template`), else a new random one. dict: root, name, key */}}
{{- define "specserve.keptRandom" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- printf "sk-%s" (randAlphaNum 40) }}
{{- end }}
{{- end }}

{{/* Topology spread constraints over nodes and zones for one component. dict: root, component, cfg */}}
{{- define "specserve.topologySpread" -}}
{{- if .cfg.topologySpread.enabled }}
topologySpreadConstraints:
{{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
  - maxSkew: 1
    topologyKey: {{ $key }}
    whenUnsatisfiable: {{ $.cfg.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "specserve.selectorLabels" (dict "root" $.root "component" $.component) | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Values that were removed, refused with what replaces them. */}}
{{- define "specserve.checkRemoved" -}}
{{- if .Values.model.pvc.create }}
{{- fail "model.pvc.create was removed: it made an empty claim nothing filled. Use model.source=download with model.download.cache (filled once by the engines), or model.pvc.claimName of a filled claim" }}
{{- end }}
{{- end }}

{{/* A three-way switch as an environment value: true "1", false "0", "" (unset) "". */}}
{{- define "specserve.switch" -}}
{{- if kindIs "bool" . }}{{ ternary "1" "0" . }}{{ end }}
{{- end }}
