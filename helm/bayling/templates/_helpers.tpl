{{/* Names and labels ------------------------------------------------------------------------ */}}
{{- define "bayling.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bayling.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "bayling.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bayling.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bayling.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "bayling.labels" -}}
helm.sh/chart: {{ include "bayling.chart" .root }}
{{ include "bayling.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: bayling
{{- end }}

{{- define "bayling.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bayling.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Images ---------------------------------------------------------------------------------- */}}
{{- define "bayling.image" -}}
{{- $img := index .Values.image .Values.mode }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}

{{- define "bayling.pullPolicy" -}}
{{- (index .Values.image .Values.mode).pullPolicy }}
{{- end }}

{{- define "bayling.clientImage" -}}
{{- printf "%s:%s" .Values.image.cpu.repository .Values.image.cpu.tag }}
{{- end }}

{{- define "bayling.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The release being served, and the engine -------------------------------------------------- */}}
{{- define "bayling.releaseEntry" -}}
{{- $entry := index .Values.model.releases .Values.model.release }}
{{- if not $entry }}
{{- fail (printf "model.release %q is not a key of model.releases (%s)" .Values.model.release (keys .Values.model.releases | sortAlpha | join ", ")) }}
{{- end }}
{{- toJson $entry }}
{{- end }}

{{- define "bayling.engineName" -}}
{{- if .Values.engine.name }}
{{- .Values.engine.name }}
{{- else if eq .Values.mode "gpu" }}
{{- printf "%s-trtllm-%s%s" (lower .Values.model.release) .Values.engine.build.quant (ternary "-kv8" "" (eq .Values.engine.build.kvCache "int8")) }}
{{- else }}
{{- printf "%s-%s-%s" (lower .Values.model.release) (ternary "ct2" "gguf" (eq .Values.engine.build.cpuTarget "cpu-ct2")) .Values.engine.build.cpuQuantization }}
{{- end }}
{{- end }}

{{/* Everything that shapes the built engine; its hash names the engine folder and the Job. */}}
{{- define "bayling.buildSpec" -}}
{{- $r := include "bayling.releaseEntry" . | fromJson }}
{{- $b := .Values.engine.build }}
{{- $spec := dict "release" .Values.model.release "repo" $r.repo "revision" .Values.model.revision "delta" $r.delta "weightsSource" .Values.weights.source "image" (include "bayling.image" .) "maxContext" $b.maxContext "extraArgs" $b.extraArgs }}
{{- if $r.delta }}
{{- $_ := set $spec "base" $r.base }}
{{- $_ := set $spec "baseRevision" .Values.model.baseRevision }}
{{- end }}
{{- if eq .Values.weights.source "volume" }}
{{- $_ := set $spec "volume" (dict "claimName" .Values.weights.volume.claimName "modelPath" .Values.weights.volume.modelPath "basePath" .Values.weights.volume.basePath) }}
{{- end }}
{{- if eq .Values.mode "gpu" }}
{{- $_ := set $spec "target" "trtllm" }}
{{- $_ := set $spec "quant" $b.quant }}
{{- $_ := set $spec "kvCache" $b.kvCache }}
{{- $_ := set $spec "gpuMemory" $b.gpuMemory }}
{{- else }}
{{- $_ := set $spec "target" $b.cpuTarget }}
{{- $_ := set $spec "cpuQuantization" $b.cpuQuantization }}
{{- end }}
{{- toJson $spec }}
{{- end }}

{{- define "bayling.specHash" -}}
{{- include "bayling.buildSpec" . | sha256sum | trunc 12 }}
{{- end }}

{{- define "bayling.buildJobName" -}}
{{- printf "%s-build-%s" (include "bayling.fullname" . | trunc 47 | trimSuffix "-") (include "bayling.specHash" . | trunc 8) }}
{{- end }}

{{- define "bayling.engineClaim" -}}
{{- if eq .Values.engine.source "existing" }}
{{- .Values.engine.existing.claimName }}
{{- else }}
{{- default (printf "%s-engines" (include "bayling.fullname" .)) .Values.engine.persistence.existingClaim }}
{{- end }}
{{- end }}

{{/* Where serving pods find the engine, and the file that says it is complete. */}}
{{- define "bayling.engineDir" -}}
{{- if eq .Values.engine.source "build" }}
{{- printf "/data/engines/%s-%s" (include "bayling.engineName" .) (include "bayling.specHash" .) }}
{{- else if eq .Values.engine.source "existing" }}
{{- printf "/data/%s" (trimPrefix "/" .Values.engine.existing.path) | trimSuffix "/" }}
{{- else }}
{{- .Values.engine.builtin.path }}
{{- end }}
{{- end }}

{{- define "bayling.readyMarker" -}}
{{- if eq .Values.engine.source "build" }}
{{- printf "%s.ready" (include "bayling.engineDir" .) }}
{{- else }}
{{- printf "%s/manifest.json" (include "bayling.engineDir" .) }}
{{- end }}
{{- end }}

{{/* Scheduling of the current mode (GPU or CPU nodes) */}}
{{- define "bayling.scheduling" -}}
{{- $s := index .Values.scheduling .Values.mode }}
{{- if and (eq .Values.mode "gpu") .Values.scheduling.gpu.runtimeClassName }}
runtimeClassName: {{ .Values.scheduling.gpu.runtimeClassName }}
{{- end }}
{{- with $s.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources of the current mode; GPU mode adds the GPU limit (and request). */}}
{{- define "bayling.resources" -}}
{{- $res := deepCopy (index .resources .root.Values.mode) }}
{{- if eq .root.Values.mode "gpu" }}
{{- $gpu := .root.Values.scheduling.gpu }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits $gpu.resourceName $gpu.count }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := default dict $res.requests }}
{{- $_ := set $requests $gpu.resourceName $gpu.count }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* PromQL: requests waiting, per pod (prometheus-adapter template): the queue the endpoint picker
balances on (its TotalQueuedRequests metric), so the autoscaler adds a pod when the picker has
nowhere short to send requests. GPU: TensorRT-LLM's waiting requests. CPU: the CPU engine's waiting
requests plus those Triton holds before the bayling model. */}}
{{- define "bayling.waitingQuery" -}}
{{- if eq .Values.mode "gpu" -}}
sum(nv_trt_llm_request_metrics{request_type="waiting",<<.LabelMatchers>>}) by (<<.GroupBy>>)
{{- else -}}
sum(bayling_engine_waiting_requests{<<.LabelMatchers>>}) by (<<.GroupBy>>) + sum(nv_inference_pending_request_count{model="bayling",<<.LabelMatchers>>}) by (<<.GroupBy>>)
{{- end }}
{{- end }}

{{/* The same, summed over this release's pods (KEDA). */}}
{{- define "bayling.waitingQueryTotal" -}}
{{- $sel := printf "namespace=\"%s\",pod=~\"%s-[a-z0-9]+-[a-z0-9]+\"" .Release.Namespace (include "bayling.fullname" .) }}
{{- if eq .Values.mode "gpu" -}}
sum(nv_trt_llm_request_metrics{request_type="waiting",{{ $sel }}})
{{- else -}}
sum(bayling_engine_waiting_requests{ {{- $sel -}} }) + sum(nv_inference_pending_request_count{model="bayling",{{ $sel }}})
{{- end }}
{{- end }}

{{/* PromQL: the KV-cache fraction in use, per pod (the picker's KVCacheUtilization metric). */}}
{{- define "bayling.kvQuery" -}}
{{- if eq .Values.mode "gpu" -}}
max(nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",<<.LabelMatchers>>}) by (<<.GroupBy>>)
{{- else -}}
max(bayling_engine_kv_cache_utilization{<<.LabelMatchers>>}) by (<<.GroupBy>>)
{{- end }}
{{- end }}

{{/* Routing: the headless Service, the URL clients balance over, the endpoint picker ---------- */}}
{{- define "bayling.headlessName" -}}
{{- printf "%s-headless" (include "bayling.fullname" .) }}
{{- end }}

{{- define "bayling.balancedUrl" -}}
{{- printf "dns:///%s:%v" (include "bayling.headlessName" .) .Values.triton.ports.grpc }}
{{- end }}

{{- define "bayling.eppName" -}}
{{- printf "%s-epp" (include "bayling.fullname" .) }}
{{- end }}

{{/* The engine type the picker reads the pods' metrics as: TensorRT-LLM's own names (built into
the picker), or the CPU engine's bayling_engine_* gauges (configured in the picker's ConfigMap). */}}
{{- define "bayling.engineType" -}}
{{- ternary "triton-tensorrt-llm" "bayling-cpu" (eq .Values.mode "gpu") }}
{{- end }}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "bayling.validate" -}}
{{- $b := .Values.engine.build }}
{{- if and (eq .Values.mode "cpu") (eq $b.cpuTarget "cpu") (not (has $b.cpuQuantization (list "q8_0" "f16" "f32"))) }}
{{- fail (printf "engine.build.cpuQuantization=%s is a CTranslate2 quantization: the llama.cpp engine (cpuTarget cpu) takes q8_0, f16 or f32" $b.cpuQuantization) }}
{{- end }}
{{- if and (eq .Values.mode "cpu") (eq $b.cpuTarget "cpu-ct2") (has $b.cpuQuantization (list "q8_0" "f16" "f32")) }}
{{- fail (printf "engine.build.cpuQuantization=%s is a llama.cpp quantization: the CTranslate2 engine (cpuTarget cpu-ct2) takes int8, int8_float16, int8_float32 or int8_bfloat16" $b.cpuQuantization) }}
{{- end }}
{{- $r := include "bayling.releaseEntry" . | fromJson }}
{{- if and (eq .Values.engine.source "builtin") (ne .Values.mode "cpu") }}
{{- fail "engine.source=builtin is the CPU image's embedded engine: it needs mode=cpu" }}
{{- end }}
{{- if and (eq .Values.engine.source "existing") (or (not .Values.engine.existing.claimName) (not .Values.engine.existing.path)) }}
{{- fail "engine.source=existing needs engine.existing.claimName and engine.existing.path" }}
{{- end }}
{{- if and (eq .Values.engine.source "build") (eq .Values.weights.source "volume") }}
{{- if or (not .Values.weights.volume.claimName) (not .Values.weights.volume.modelPath) }}
{{- fail "weights.source=volume needs weights.volume.claimName and weights.volume.modelPath" }}
{{- end }}
{{- if and $r.delta (not .Values.weights.volume.basePath) }}
{{- fail (printf "%s is a weight difference over LLaMA: weights.volume.basePath must name the base model folder" .Values.model.release) }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "enable either autoscaling.hpa or autoscaling.keda, not both (KEDA creates its own HPA)" }}
{{- end }}
{{- if and .Values.autoscaling.keda.enabled (not (.Capabilities.APIVersions.Has "keda.sh/v1alpha1")) }}
{{- fail "autoscaling.keda.enabled: the cluster has no keda.sh/v1alpha1 API (install KEDA; with helm template pass --api-versions keda.sh/v1alpha1)" }}
{{- end }}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled) (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}
{{- fail "metrics.serviceMonitor/podMonitor: the cluster has no monitoring.coreos.com/v1 API (install the Prometheus Operator; with helm template pass --api-versions monitoring.coreos.com/v1)" }}
{{- end }}
{{- if eq .Values.routing.mode "inference-pool" }}
{{- range list "inference.networking.k8s.io/v1" "gateway.networking.k8s.io/v1" }}
{{- if not ($.Capabilities.APIVersions.Has .) }}
{{- fail (printf "routing.mode=inference-pool: the cluster has no %s API (install the Gateway API and Inference Extension CRDs; with helm template pass --api-versions %s)" . .) }}
{{- end }}
{{- end }}
{{- range $name, $port := .Values.triton.ports }}
{{- if eq (int $port) (int $.Values.routing.inferencePool.sidecar.port) }}
{{- fail (printf "routing.inferencePool.sidecar.port %v is Triton's %s port: choose another" $port $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- range .paths }}
{{- if and (eq .backend "openai") (not $.Values.openaiGateway.enabled) }}
{{- fail (printf "ingress path %s goes to the OpenAI gateway: set openaiGateway.enabled=true" .path) }}
{{- end }}
{{- if and (eq .backend "demo") (not $.Values.demoUI.enabled) }}
{{- fail (printf "ingress path %s goes to the demo UI: set demoUI.enabled=true" .path) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
