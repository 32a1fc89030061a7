{{/* The engine pod template, shared by the Deployment (one pod per engine) and the
LeaderWorkerSet (multi-node: a leader that serves HTTP and headless workers).
dict: root, role ("single", "leader" or "worker") */}}
{{- define "specserve.enginePodTemplate" -}}
{{- $ := .root }}
{{- $role := .role }}
{{- $v := $.Values }}
{{- $modelDir := include "specserve.modelDir" $ }}
{{- $spec := include "specserve.speculativeConfig" $ }}
{{- $tp := int (include "specserve.tensorParallelSize" $) }}
{{- $cacheClaim := include "specserve.modelCacheClaim" $ }}
{{- $grace := include "specserve.gracePeriod" (dict "preStop" $v.engine.preStopSleepSeconds "drain" $v.engine.shutdownTimeoutSeconds "given" $v.engine.terminationGracePeriodSeconds "margin" 15 "what" "engine") }}
metadata:
  labels:
    {{- include "specserve.podLabels" (dict "root" $ "component" "engine") | nindent 4 }}
    specserve.io/drafter: {{ $v.speculation.drafter | default "none" | quote }}
  {{- with $v.engine.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "specserve.serviceAccountName" $ }}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: {{ $grace }}
  {{- with $v.engine.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $v.engine.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- if eq $v.model.source "download" }}
  initContainers:
    - name: model-download
      image: {{ include "specserve.image" (dict "root" $ "image" $v.engine.image) }}
      imagePullPolicy: {{ $v.engine.image.pullPolicy }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      command:
        - python
        - -c
        - |
          import os, pathlib
          from huggingface_hub import snapshot_download
          done = pathlib.Path(os.environ["MODEL_DIR"]) / ".specserve-complete"
          if not done.exists():  # a shared cache is filled once, by the first pod
              snapshot_download(os.environ["MODEL_REPO"], revision=os.environ["MODEL_REVISION"],
                                local_dir=os.environ["MODEL_DIR"])
              done.write_text(os.environ["MODEL_REVISION"])
      env:
        - name: HF_HUB_OFFLINE
          value: "0"
        - name: MODEL_REPO
          value: {{ required "model.download.repo is required with model.source=download" $v.model.download.repo | quote }}
        - name: MODEL_REVISION
          value: {{ include "specserve.modelRevision" $ | quote }}
        - name: MODEL_DIR
          value: {{ $modelDir | quote }}
        {{- if $v.model.download.tokenSecret.name }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.model.download.tokenSecret.name }}
              key: {{ $v.model.download.tokenSecret.key }}
        {{- end }}
      volumeMounts:
        - name: model
          mountPath: /models
        - name: cache
          mountPath: /home/specserve/.cache
      resources:
        requests: {cpu: 100m, memory: 256Mi}
        limits: {cpu: "1", memory: 1Gi}
  {{- end }}
  containers:
    - name: engine
      image: {{ include "specserve.image" (dict "root" $ "image" $v.engine.image) }}
      imagePullPolicy: {{ $v.engine.image.pullPolicy }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      args:
        - engine
        - --max-model-len={{ $v.engine.maxModelLen }}
        {{- if eq $v.engine.device "gpu" }}
        - --tensor-parallel-size={{ $tp }}
        {{- end }}
        {{- if ne $role "single" }}
        - --pipeline-parallel-size={{ $v.engine.multiNode.nodes }}
        - --nnodes={{ $v.engine.multiNode.nodes }}
        - --node-rank=$(LWS_WORKER_INDEX)
        - --master-addr=$(LWS_LEADER_ADDRESS)
        - --master-port={{ $v.engine.multiNode.masterPort }}
        {{- end }}
        - --shutdown-timeout={{ $v.engine.shutdownTimeoutSeconds }}
        {{- range $v.engine.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- if eq $role "worker" }}
        # Workers run vLLM headless: no HTTP server, ranks driven by the leader.
        - name: SPECSERVE_ENGINE_HEADLESS
          value: "1"
        {{- end }}
        - name: SPECSERVE_ENGINE_PORT
          value: {{ $v.engine.port | quote }}
        - name: SPECSERVE_HEALTH_URL
          value: "http://127.0.0.1:{{ $v.engine.port }}/health"
        {{- if $v.engineAuth.enabled }}
        - name: SPECSERVE_ENGINE_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "specserve.engineKeySecretName" $ }}
              key: {{ $v.engineAuth.secretKey }}
        {{- end }}
        {{- if $modelDir }}
        - name: SPECSERVE_MODEL
          value: {{ $modelDir | quote }}
        {{- end }}
        {{- if $v.model.servedName }}
        - name: SPECSERVE_SERVED_MODEL_NAME
          value: {{ $v.model.servedName | quote }}
        {{- end }}
        {{- if $spec }}
        - name: SPECSERVE_SPECULATIVE_CONFIG
          value: {{ $spec | quote }}
        - name: SPECSERVE_DRAFTER
          value: {{ $v.speculation.drafter | quote }}
        {{- end }}
        # The specserve plugin's settings (docs/configuration.md): every one set, defaults the code's.
        - name: SPECSERVE_JSON_MODE
          value: {{ $v.engine.settings.jsonMode | quote }}
        - name: SPECSERVE_JSON_OBJECTS
          value: {{ $v.engine.settings.jsonObjects | quote }}
        - name: SPECSERVE_JUMP_FORWARD
          value: {{ ternary "1" "0" $v.engine.settings.jumpForward | quote }}
        - name: SPECSERVE_JUMP_FORWARD_STRINGS
          value: {{ ternary "1" "0" $v.engine.settings.jumpForwardStrings | quote }}
        - name: SPECSERVE_HEADS_DIR
          value: {{ $v.speculation.heads | quote }}
        - name: SPECSERVE_TREE
          value: {{ $v.speculation.tree | quote }}
        - name: SPECSERVE_ENGINE_SPEC_POLICY
          value: {{ $v.speculation.enginePolicy | quote }}
        - name: SPECSERVE_ENGINE_CALIBRATION
          value: {{ $v.speculation.calibration | quote }}
        # Tool calling: the entry point turns these into vLLM's tool flags ("" = the code's default).
        - name: SPECSERVE_TOOL_CALL_PARSER
          value: {{ $v.engine.tools.callParser | quote }}
        - name: SPECSERVE_ENABLE_AUTO_TOOL_CHOICE
          value: {{ include "specserve.switch" $v.engine.tools.enableAutoToolChoice | quote }}
        - name: SPECSERVE_TOOL_PARSER_PLUGIN
          value: {{ $v.engine.tools.parserPlugin | quote }}
        - name: SPECSERVE_CHAT_TEMPLATE
          value: {{ $v.engine.tools.chatTemplate | quote }}
        {{- with $v.engine.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if ne $role "worker" }}
      ports:
        - name: http
          containerPort: {{ $v.engine.port }}
          protocol: TCP
      startupProbe:
        {{- toYaml $v.engine.startupProbe | nindent 8 }}
      readinessProbe:
        {{- toYaml $v.engine.readinessProbe | nindent 8 }}
      livenessProbe:
        {{- toYaml $v.engine.livenessProbe | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ $v.engine.preStopSleepSeconds }}"]
      resources:
        {{- $res := deepCopy $v.engine.resources }}
        {{- if $v.engine.guaranteedQoS }}
        {{- $limits := default dict $res.limits }}
        {{- if not (and $limits.cpu $limits.memory) }}
        {{- fail "engine.guaranteedQoS needs engine.resources.limits.cpu and .memory" }}
        {{- end }}
        {{- $_ := set $res "requests" (merge (pick $limits "cpu" "memory") (deepCopy (default dict $res.requests))) }}
        {{- $_ := set $res.requests "cpu" $limits.cpu }}
        {{- $_ := set $res.requests "memory" $limits.memory }}
        {{- end }}
        {{- if eq $v.engine.device "gpu" }}
        {{- $gpu := dict "nvidia.com/gpu" (int $v.engine.gpus) }}
        {{- $_ := set $res "limits" (merge (deepCopy (default dict $res.limits)) $gpu) }}
        {{- $_ := set $res "requests" (merge (deepCopy (default dict $res.requests)) $gpu) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: cache
          mountPath: /home/specserve/.cache
        {{- if ne $v.model.source "demo" }}
        - name: model
          mountPath: /models
          readOnly: true
        {{- end }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $v.engine.shmSize }}
    - name: cache
      emptyDir: {}
    {{- if eq $v.model.source "pvc" }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ required "model.pvc.claimName is required with model.source=pvc (a claim that already holds the model)" $v.model.pvc.claimName }}
        readOnly: true
    {{- else if eq $v.model.source "hostPath" }}
    - name: model
      hostPath:
        path: {{ required "model.hostPath.path is required with model.source=hostPath" $v.model.hostPath.path }}
        type: Directory
    {{- else if and (eq $v.model.source "download") $cacheClaim }}
    - name: model
      persistentVolumeClaim:
        claimName: {{ $cacheClaim }}
    {{- else if eq $v.model.source "download" }}
    - name: model
      emptyDir:
        sizeLimit: {{ $v.model.download.sizeLimit }}
    {{- end }}
  {{- if eq $v.engine.device "gpu" }}
  {{- $gpuToleration := list (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
  tolerations:
    {{- toYaml (concat $gpuToleration $v.engine.tolerations) | nindent 4 }}
  {{- else }}
  {{- with $v.engine.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  {{- with $v.engine.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.engine.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $role "single" }}
  {{- include "specserve.topologySpread" (dict "root" $ "component" "engine" "cfg" $v.engine) | trim | nindent 2 }}
  {{- end }}
{{- end }}
