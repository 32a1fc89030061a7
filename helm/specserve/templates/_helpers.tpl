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

{{/* Labels on every object. */}}
{{- define "specserve.labels" -}}
helm.sh/chart: {{ include "specserve.chart" . }}
app.kubernetes.io/name: {{ include "specserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
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

{{- define "specserve.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
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

{{- define "specserve.modelClaimName" -}}
{{- if .Values.model.pvc.claimName }}
{{- .Values.model.pvc.claimName }}
{{- else }}
{{- printf "%s-model" (include "specserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Model directory inside the engine container; "" = the demo model of the image. */}}
{{- define "specserve.modelDir" -}}
{{- if eq .Values.model.source "demo" }}
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
{{- $cfg := dict "method" $drafter "num_speculative_tokens" (int .Values.speculation.numSpeculativeTokens) }}
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
